"""JSONL records for post-training (preference pairs, RL prompts): read whole (such sets are
small next to pre-training corpora), each bad line an error naming the file, the line and the
field, and a stable held-out split (train/data/packing.held_out on the record's index)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..data.packing import held_out


def read_records(path: str | Path, check) -> list[dict]:
    """Every non-blank line of a JSONL file as a dict; `check(record)` returns None or what is
    wrong with it (naming the field). ValueError naming the file and line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.source {path}: no such file (a JSONL file is needed)")
    out = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                raise ValueError(f"{path} line {lineno}: not valid UTF-8 JSON ({e})") from None
            why = check(record) if isinstance(record, dict) else "not a JSON object"
            if why:
                raise ValueError(f"{path} line {lineno}: {why}")
            out.append(record)
    if not out:
        raise ValueError(f"data.source {path}: no records")
    return out


def split(records: list, path: str | Path, fraction: float) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices) by a stable hash of (the file's name, index): the
    same split wherever the file lies."""
    train, held = [], []
    for i in range(len(records)):
        (held if held_out(Path(path).name, i, fraction) else train).append(i)
    return train, held


def fingerprint(path: str | Path, *extra) -> str:
    """A digest of the file's bytes and `extra` (what else the derived data depends on)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(Path(path).read_bytes())
    h.update(repr(extra).encode())
    return h.hexdigest()


def check_prompt(r: dict) -> str | None:
    """What is wrong with a record's prompt (exactly one of `prompt` / `messages`), or None."""
    if ("prompt" in r) == ("messages" in r):
        return "needs exactly one of 'prompt' (a string) or 'messages' (a list)"
    if "prompt" in r and not isinstance(r["prompt"], str):
        return "field 'prompt' must be a string"
    if "messages" in r and not isinstance(r["messages"], list):
        return "field 'messages' must be a list of messages"
    return None
