"""Retrieval evaluation over a grid of context lengths x fact depths (passkey, needle): greedy
generation after the prompt, scored by whether the continuation starts with the answer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..infer.generate import generate
from ..train.data.synthetic import make_example

EVAL_SEED_OFFSET = 1_000_003  # keeps evaluation examples apart from training examples of a seed


@dataclass
class RetrievalResult:
    task: str
    lengths: list[int]
    depths: list[float]
    correct: dict[tuple[int, float], int] = field(default_factory=dict)
    total: dict[tuple[int, float], int] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)

    def accuracy(self, length: int | None = None, depth: float | None = None) -> float:
        keys = [k for k in self.total
                if (length is None or k[0] == length) and (depth is None or k[1] == depth)]
        n = sum(self.total[k] for k in keys)
        return sum(self.correct[k] for k in keys) / n if n else float("nan")

    def table(self) -> str:
        head = "length \\ depth | " + " | ".join(f"{d:.2f}" for d in self.depths) + " | all"
        rows = [head, "|".join(["---"] * (len(self.depths) + 2))]
        for n in self.lengths:
            cells = [f"{self.accuracy(n, d):.2f}" for d in self.depths]
            rows.append(f"{n} | " + " | ".join(cells) + f" | {self.accuracy(n):.2f}")
        rows.append("all | " + " | ".join(f"{self.accuracy(None, d):.2f}" for d in self.depths)
                    + f" | {self.accuracy():.2f}")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {"task": self.task, "accuracy": self.accuracy(),
                "grid": [{"length": n, "depth": d, "correct": self.correct[(n, d)],
                          "total": self.total[(n, d)]} for (n, d) in self.total],
                "samples": self.samples}


@torch.inference_mode()
def evaluate_retrieval(model, tokenizer, task: str, lengths: list[int], depths: list[float],
                       samples: int = 1, seed: int = 0, batch_size: int = 4,
                       progress=None) -> RetrievalResult:
    """`lengths` are prompt lengths in characters (the generator's unit; about tokens with the
    byte tokenizer). Each grid cell gets `samples` independent examples."""
    if task not in ("passkey", "needle"):
        raise ValueError(f"retrieval task must be passkey or needle, got {task!r}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    result = RetrievalResult(task, list(lengths), list(depths))
    cells = [(n, d, i) for n in lengths for d in depths for i in range(samples)]
    for start in range(0, len(cells), batch_size):
        group = cells[start:start + batch_size]
        examples = [make_example(task, index=c, seed=seed + EVAL_SEED_OFFSET, length=n, depth=d)
                    for c, (n, d, _) in enumerate(group, start)]
        prompts = [tokenizer.encode(e.prompt) for e in examples]
        answers = [tokenizer.encode(e.answer) for e in examples]
        budget = max(len(a) for a in answers) + 2
        out = generate(model, prompts, max_new_tokens=budget)
        width = max(len(p) for p in prompts)
        for (n, d, _), ex, ans, row in zip(group, examples, answers, out):
            continuation = row[width:].tolist()
            ok = continuation[:len(ans)] == ans
            key = (n, d)
            result.total[key] = result.total.get(key, 0) + 1
            result.correct[key] = result.correct.get(key, 0) + int(ok)
            result.samples.append({"length": n, "depth": d, "answer": ex.answer,
                                   "output": tokenizer.decode(continuation), "correct": ok})
        if progress is not None:
            progress(len(group))
    return result
