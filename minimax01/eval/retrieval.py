"""Retrieval evaluation over a grid of context lengths x fact depths (passkey, needle, MR-NIAH):
greedy generation after the prompt. Passkey and needle score 1 when the continuation starts
with the answer; MR-NIAH scores the fraction of the answer's components in the reply (mrniah.py).
Lengths past `train_length` measure extrapolation."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..infer.generate import generate as greedy
from ..train.data.synthetic import make_example
from . import mrniah

EVAL_SEED_OFFSET = 1_000_003  # keeps evaluation examples apart from training examples of a seed
TASKS = ("passkey", "needle", "mrniah")
MIN_LENGTH = {"passkey": 64, "needle": 64, "mrniah": 160}  # characters an example needs


@dataclass
class RetrievalResult:
    task: str
    lengths: list[int]
    depths: list[float]
    correct: dict[tuple[int, float], float] = field(default_factory=dict)  # summed scores
    total: dict[tuple[int, float], int] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    train_length: int | None = None  # lengths beyond it are extrapolation

    def accuracy(self, length: int | None = None, depth: float | None = None) -> float:
        keys = [k for k in self.total
                if (length is None or k[0] == length) and (depth is None or k[1] == depth)]
        n = sum(self.total[k] for k in keys)
        return sum(self.correct[k] for k in keys) / n if n else float("nan")

    def grid(self) -> list[list[float]]:
        """Mean score [depth][length] (the heatmap's cells)."""
        return [[self.accuracy(n, d) for n in self.lengths] for d in self.depths]

    def _label(self, n: int) -> str:
        if self.train_length:
            return f"{n} ({n / self.train_length:.2g}x)"
        return str(n)

    def table(self) -> str:
        head = "length \\ depth | " + " | ".join(f"{d:.2f}" for d in self.depths) + " | all"
        rows = [head, "|".join(["---"] * (len(self.depths) + 2))]
        for n in self.lengths:
            cells = [f"{self.accuracy(n, d):.2f}" for d in self.depths]
            rows.append(f"{self._label(n)} | " + " | ".join(cells) + f" | {self.accuracy(n):.2f}")
        rows.append("all | " + " | ".join(f"{self.accuracy(None, d):.2f}" for d in self.depths)
                    + f" | {self.accuracy():.2f}")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {"task": self.task, "accuracy": self.accuracy(), "train_length": self.train_length,
                "lengths": self.lengths, "depths": self.depths,
                "by_length": {str(n): self.accuracy(n) for n in self.lengths},
                "grid": [{"length": n, "depth": d, "correct": self.correct[(n, d)],
                          "total": self.total[(n, d)], "accuracy": self.accuracy(n, d)}
                         for (n, d) in self.total],
                "samples": self.samples}


def extrapolation_lengths(train_length: int, factor: float = 4.0) -> list[int]:
    """Context lengths from a quarter of the training length to `factor` times it, doubling."""
    if train_length < 1 or factor < 1:
        raise ValueError("train_length must be positive and factor >= 1")
    out, n = [], max(1, train_length // 4)
    while n <= train_length * factor:
        out.append(n)
        n *= 2
    return out


PREFILL_CHUNK = 2048  # prompt tokens per forward: bounds attention memory at long contexts


def generate(model, prompts: list[list[int]], max_new_tokens: int,
             chunk: int = PREFILL_CHUNK) -> torch.Tensor:
    """Greedy continuation of the prompts (`infer.generate` at temperature 0), the prompt going
    through the cache in chunks of `chunk` tokens, so a 128K-token prompt never builds a
    128K x 128K attention mask. Returns [B, T + max_new_tokens]."""
    return greedy(model, prompts, max_new_tokens=max_new_tokens, prefill_chunk=chunk)


def make_task_example(task: str, index: int, seed: int, length: int, depth: float):
    if task == mrniah.TASK:
        return mrniah.make_mrniah(index, seed, length, depth)
    return make_example(task, index=index, seed=seed, length=length, depth=depth)


def _score(task: str, answer: str, answer_ids: list[int], continuation: list[int], text: str) -> float:
    if task == mrniah.TASK:
        return mrniah.score(answer, text)
    return float(continuation[:len(answer_ids)] == answer_ids)


@torch.inference_mode()
def evaluate_retrieval(model, tokenizer, task: str, lengths: list[int], depths: list[float],
                       samples: int = 1, seed: int = 0, batch_size: int = 4,
                       progress=None, train_length: int | None = None) -> RetrievalResult:
    """`lengths` are prompt lengths in characters (the generator's unit; about tokens with the
    byte tokenizer). Each grid cell gets `samples` independent examples."""
    if task not in TASKS:
        raise ValueError(f"retrieval task must be one of {', '.join(TASKS)}, got {task!r}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    result = RetrievalResult(task, list(lengths), list(depths), train_length=train_length)
    cells = [(n, d, i) for n in lengths for d in depths for i in range(samples)]
    for start in range(0, len(cells), batch_size):
        group = cells[start:start + batch_size]
        examples = [make_task_example(task, c, seed + EVAL_SEED_OFFSET, n, d)
                    for c, (n, d, _) in enumerate(group, start)]
        prompts = [tokenizer.encode(e.prompt) for e in examples]
        answers = [tokenizer.encode(e.answer) for e in examples]
        budget = max(len(a) for a in answers) + 2
        out = generate(model, prompts, max_new_tokens=budget)
        width = max(len(p) for p in prompts)
        for (n, d, i), ex, ans, row in zip(group, examples, answers, out):
            continuation = row[width:].tolist()
            text = tokenizer.decode(continuation)
            s = _score(task, ex.answer, ans, continuation, text)
            key = (n, d)
            result.total[key] = result.total.get(key, 0) + 1
            result.correct[key] = result.correct.get(key, 0) + s
            result.samples.append({"id": f"{task}/{n}/{d}/{i}", "length": n, "depth": d,
                                   "answer": ex.answer, "output": text, "score": s,
                                   "correct": s == 1.0})
        if progress is not None:
            progress(len(group))
    return result
