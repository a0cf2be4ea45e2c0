"""MR-NIAH-style multi-round retrieval, generated here (after MiniMax's Multi-Round
Needles-In-A-Haystack: the haystack is a long user/assistant dialogue; the last user turn asks
the assistant to repeat one of its earlier answers, which sits at a chosen depth).

Every round is a request and an answer with three key components (an adjective, a colour and a
number); the score of a sample is the fraction of the asked answer's components that the model's
reply (its first line) contains - MR-NIAH's adjusted recall, here over three components. Examples
are deterministic in (seed, index, length, depth), plain text, lengths in characters (about
tokens with the byte tokenizer)."""

from __future__ import annotations

import random
import re
import string

from ..train.data.synthetic import Example

TASK = "mrniah"
_INTRO = "A conversation between a user and an assistant.\n"
_OBJECTS = ("boat", "lamp", "clock", "bridge", "garden", "violin", "kettle", "tower", "mirror",
            "wagon", "statue", "chair", "kite", "drum", "lantern", "window")
_ADJECTIVES = ("quiet", "heavy", "bright", "ancient", "narrow", "gentle", "crooked", "polished",
               "hollow", "tiny", "enormous", "rusty", "elegant", "fragile", "sturdy", "curious")
_COLOURS = ("amber", "crimson", "teal", "ivory", "olive", "violet", "silver", "scarlet", "indigo",
            "bronze", "coral", "jade")
_ANSWER = re.compile(r"^The (.+) is (\w+), (\w+) and (\d+)\.$")


def _topic(rng: random.Random, used: set[str]) -> str:
    while True:
        code = "".join(rng.choice(string.ascii_uppercase) for _ in range(2)) + str(rng.randint(0, 9))
        topic = f"{rng.choice(_OBJECTS)} {code}"
        if topic not in used:
            used.add(topic)
            return topic


def _answer(rng: random.Random, topic: str) -> str:
    return (f"The {topic} is {rng.choice(_ADJECTIVES)}, {rng.choice(_COLOURS)} and "
            f"{rng.randint(100, 999)}.")


def _round(topic: str, answer: str) -> str:
    return f"User: Describe the {topic}.\nAssistant: {answer}\n"


def make_mrniah(index: int, seed: int = 0, length: int = 2048, depth: float | None = None) -> Example:
    """Example number `index`: rounds of requests and answers filling about `length` characters,
    the asked round at `depth` of them (0 = first round, 1 = last; None draws it)."""
    if length < 160:
        raise ValueError(f"MR-NIAH examples need length >= 160 characters, got {length}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(f"minimax01-mrniah/{seed}/{index}")
    depth = rng.random() if depth is None else depth
    used: set[str] = set()
    target = _topic(rng, used)
    answer = _answer(rng, target)
    question = f"User: Repeat exactly what you said about the {target}.\nAssistant: "
    budget = length - len(_INTRO) - len(question) - len(answer) - len(_round(target, answer))
    rounds: list[str] = []
    size = 0
    while True:
        topic = _topic(rng, used)
        r = _round(topic, _answer(rng, topic))
        if size + len(r) > budget and rounds:
            break
        rounds.append(r)
        size += len(r)
    rounds.insert(int(round(depth * len(rounds))), _round(target, answer))
    return Example(TASK, _INTRO + "".join(rounds) + question, answer, depth)


def components(answer: str) -> list[str]:
    """The three key components of an answer."""
    m = _ANSWER.match(answer)
    if not m:
        raise ValueError(f"not an MR-NIAH answer: {answer!r}")
    return [m.group(2), m.group(3), m.group(4)]


def score(answer: str, output: str) -> float:
    """Fraction of the answer's components present (as whole words) in the reply's first line."""
    line = output.split("\n", 1)[0]
    words = set(re.findall(r"\w+", line))
    parts = components(answer)
    return sum(p in words for p in parts) / len(parts)
