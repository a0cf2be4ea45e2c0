"""Synthetic verifiable tasks for post-training tests and benchmarks, deterministic from
(seed, index): addition problems ("23+45=" -> "68"), preference pairs over them (the correct sum
chosen, a wrong one rejected) and format-only warm-up documents (the problem followed by a
random number: the model learns where the answer goes, not what it is)."""

from __future__ import annotations

import json
import random
from pathlib import Path


def addition(index: int, seed: int = 0, digits: int = 2, max_sum: int | None = None
             ) -> tuple[str, str]:
    """(prompt, answer) of problem `index`: two numbers of up to `digits` digits (and a sum of at
    most `max_sum`, when given)."""
    rng = random.Random(f"minimax01-addition/{seed}/{index}")
    hi = 10 ** digits - 1
    while True:
        a, b = rng.randint(0, hi), rng.randint(0, hi)
        if max_sum is None or a + b <= max_sum:
            return f"{a}+{b}=", str(a + b)


def wrong_answer(answer: str, rng: random.Random) -> str:
    value = int(answer)
    while True:
        other = max(0, value + rng.choice([-1, 1]) * rng.randint(1, 10))
        if other != value:
            return str(other)


def write_prompts(path: str | Path, n: int, seed: int = 0, digits: int = 2,
                  max_sum: int | None = None) -> Path:
    """JSONL of {"prompt", "answer"} (train.rl.prompts)."""
    lines = [json.dumps(dict(zip(("prompt", "answer"), addition(i, seed, digits, max_sum))))
             for i in range(n)]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def write_preferences(path: str | Path, n: int, seed: int = 0, digits: int = 2,
                      max_sum: int | None = None) -> Path:
    """JSONL of {"prompt", "chosen" (the sum), "rejected" (a wrong sum)} (DPO)."""
    rng = random.Random(f"minimax01-addition-pairs/{seed}")
    out = []
    for i in range(n):
        prompt, answer = addition(i, seed, digits, max_sum)
        out.append(json.dumps({"prompt": prompt, "chosen": answer,
                               "rejected": wrong_answer(answer, rng)}))
    Path(path).write_text("\n".join(out) + "\n")
    return Path(path)


def write_format_docs(path: str | Path, n: int, seed: int = 0, digits: int = 2,
                      max_sum: int | None = None) -> Path:
    """JSONL of {"text": "a+b=<random number>"}: SFT on the answer's format only."""
    rng = random.Random(f"minimax01-addition-format/{seed}")
    top = max_sum if max_sum is not None else 2 * (10 ** digits - 1)
    lines = [json.dumps({"text": addition(i, seed, digits, max_sum)[0] + str(rng.randint(0, top))})
             for i in range(n)]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)
