"""Synthetic long-context tasks, generated deterministically from (task, seed, index): passkey
retrieval, needle-in-a-haystack retrieval and multi-query associative recall (MQAR).

Each example is plain text (so any tokenizer works) split into a `prompt` and the `answer` that
follows it; training uses `prompt + answer` as a document, evaluation feeds the prompt and checks
the continuation. Lengths are in characters (about tokens with the byte tokenizer)."""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

TASKS = ("passkey", "needle", "mqar")


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str
    depth: float | None = None  # where the fact sits in the context (0 = start, 1 = end)

    @property
    def text(self) -> str:
        return self.prompt + self.answer


def make_example(task: str, index: int, seed: int = 0, length: int = 2048,
                 depth: float | None = None) -> Example:
    """Example number `index` of `task`: the same text on every machine for the same arguments.
    `depth` in [0, 1] places the fact (passkey, needle); None draws it at random."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; available: {', '.join(TASKS)}")
    if length < 64:
        raise ValueError(f"synthetic examples need length >= 64 characters, got {length}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(f"minimax01-synthetic/{task}/{seed}/{index}")
    return _GENERATORS[task](rng, length, depth)


_PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant "
                  "text. Find it and memorize it.\n")
_PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                   "There and back again. ")


def _fill(filler_fn, rng: random.Random, budget: int) -> str:
    parts, size = [], 0
    while size < budget:
        s = filler_fn(rng)
        parts.append(s)
        size += len(s)
    text = "".join(parts)[:max(budget, 0)]
    end = text.rfind(". ")  # end on a whole sentence
    return text[:end + 2] if end >= 0 else text


def _insert(haystack: str, fact: str, depth: float) -> str:
    """Put `fact` at the sentence boundary nearest to `depth` of the haystack."""
    cut = int(round(depth * len(haystack)))
    boundary = haystack.rfind(". ", 0, cut)
    cut = 0 if boundary < 0 else boundary + 2
    return haystack[:cut] + fact + haystack[cut:]


def _passkey(rng: random.Random, length: int, depth: float | None) -> Example:
    key = str(rng.randint(10000, 99999))
    fact = f"The pass key is {key}. Remember it. {key} is the pass key. "
    question = "\nWhat is the pass key? The pass key is "
    depth = rng.random() if depth is None else depth
    budget = length - len(_PASSKEY_INTRO) - len(fact) - len(question) - len(key)
    haystack = _fill(lambda r: _PASSKEY_FILLER, rng, budget)
    return Example("passkey", _PASSKEY_INTRO + _insert(haystack, fact, depth) + question, key,
                   depth)


_SUBJECTS = ("The old farmer", "A quiet student", "The tired engineer", "Our neighbour",
             "The young painter", "A travelling merchant", "The careful doctor", "My cousin")
_VERBS = ("watched", "repaired", "painted", "described", "carried", "forgot", "counted", "found")
_OBJECTS = ("the wooden boat", "a red bicycle", "the broken clock", "an empty bottle",
            "the tall lighthouse", "a small garden", "the winter coat", "a paper map")
_PLACES = ("near the river", "after breakfast", "in the market", "before the storm",
           "on the hill", "during the festival", "at the station", "behind the library")
_CITIES = ("Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Hanoi", "Perth", "Bergen", "Cusco",
           "Dakar", "Krakow", "Tbilisi", "Fez", "Hobart", "Medellin", "Riga")


def _sentence(rng: random.Random) -> str:
    return (f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
            f"{rng.choice(_PLACES)}. ")


def _needle(rng: random.Random, length: int, depth: float | None) -> Example:
    city = rng.choice(_CITIES)
    number = str(rng.randint(1_000_000, 9_999_999))
    fact = f"The special magic number for {city} is {number}. "
    question = f"\nWhat is the special magic number for {city}? The special magic number for {city} is "
    depth = rng.random() if depth is None else depth
    budget = length - len(fact) - len(question) - len(number)
    haystack = _fill(_sentence, rng, budget)
    return Example("needle", _insert(haystack, fact, depth) + question, number, depth)


def _mqar(rng: random.Random, length: int, depth: float | None) -> Example:
    """`Remember: abc=123, ...` then queries `key=value` for keys drawn from the list; the
    prompt ends at the last query's `key=`, the answer is its value."""
    head = "Remember: "
    pair_len = len("abc=123, ")
    num_pairs = max(2, (length - len(head)) // (2 * pair_len))
    keys: list[str] = []
    seen: set[str] = set()
    while len(keys) < num_pairs:
        k = "".join(rng.choice(string.ascii_lowercase) for _ in range(3))
        if k not in seen:
            seen.add(k)
            keys.append(k)
    values = {k: str(rng.randint(100, 999)) for k in keys}
    context = head + ", ".join(f"{k}={values[k]}" for k in keys) + ".\nRecall: "
    queries = [rng.choice(keys) for _ in range(max(1, (length - len(context)) // pair_len))]
    body = ", ".join(f"{k}={values[k]}" for k in queries[:-1])
    last = queries[-1]
    prompt = context + (body + ", " if body else "") + f"{last}="
    return Example("mqar", prompt, values[last], None)


_GENERATORS = {"passkey": _passkey, "needle": _needle, "mqar": _mqar}
