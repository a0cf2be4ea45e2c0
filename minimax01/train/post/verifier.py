"""Rewards for online RL: a verifier is `fn(prompt: str, completion: str, answer) -> float`
(`answer` is the prompt record's "answer", None if it has none). `train.rl.verifier` names a
built-in ("exact_match") or a Python function as "module:function" (the module importable from
the run's PYTHONPATH)."""

from __future__ import annotations

import importlib
import math


def exact_match(prompt: str, completion: str, answer) -> float:
    """1.0 when the completion, stripped, is the answer, stripped; else 0.0."""
    return float(answer is not None and completion.strip() == str(answer).strip())


BUILTIN = {"exact_match": exact_match}


def load_verifier(spec: str):
    """The function `spec` names; ValueError naming train.rl.verifier otherwise."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"train.rl.verifier must be a built-in ({', '.join(BUILTIN)}) or "
                         f"module:function, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise ValueError(f"train.rl.verifier {spec!r}: cannot import {module!r} ({e})") from None
    except AttributeError:
        raise ValueError(f"train.rl.verifier {spec!r}: {module!r} has no {name!r}") from None
    if not callable(fn):
        raise ValueError(f"train.rl.verifier {spec!r} is not callable")
    return fn


def score(fn, prompt: str, completion: str, answer) -> float:
    """The verifier's reward as a finite float (ValueError naming the verifier otherwise)."""
    value = fn(prompt, completion, answer)
    if isinstance(value, bool):
        value = float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"train.rl.verifier returned {value!r} for a completion; it must "
                         f"return a finite number")
    return float(value)
