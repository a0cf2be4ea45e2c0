"""Packing documents into training rows.

`TokenStream` turns a source's units into one resumable stream of tokens with document-start
flags, for one split (train or the held-out "eval" split chosen by a stable hash of each unit).
`Packer` cuts the stream into rows of `seq_len` inputs with next-token targets: a target is -100
where it would cross into another document, and every document (or the part of it inside a row)
is its own `cu_seqlens` segment, so no token attends across documents or rows and the lightning
state restarts per document. Consecutive rows overlap by one token (a row's last target is the
next row's first input), so no token goes unpredicted."""

from __future__ import annotations

import dataclasses
import hashlib
import random
from typing import Iterator

import torch


IGNORE_INDEX = -100
_SALT = b"minimax01-heldout/"


def held_out(shard_name: str, pos: int, fraction: float) -> bool:
    """Whether a unit belongs to the held-out split: a hash of (shard, position), independent of
    the seed, the epoch and the number of ranks."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(_SALT + f"{shard_name}@{pos}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64 < fraction


class TokenStream:
    """Tokens of one split of a source, in order, with `state_dict()` / `load_state_dict()`.

    Training streams loop over epochs (the shard order reshuffled each epoch when `shuffle`);
    the held-out stream is read once, in file order."""

    def __init__(self, shards: list, tokenizer, split: str = "train", eval_fraction: float = 0.0,
                 seed: int = 0, shuffle: bool = True, add_bos: bool = True, add_eos: bool = True):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        self.shards, self.tok = shards, tokenizer
        self.split, self.fraction, self.seed = split, eval_fraction, seed
        self.shuffle = shuffle and split == "train"
        self.loop = split == "train"
        self.bos = tokenizer.bos_id if add_bos else None
        self.eos = tokenizer.eos_id if add_eos else None
        self.epoch, self.cursor, self.pos, self.new_doc = 0, 0, None, True
        self._tokens: list[int] = []
        self._starts: list[bool] = []
        self._learn: list[bool] | None = None
        self.offset = 0
        self._units: Iterator | None = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"split": self.split, "epoch": self.epoch, "cursor": self.cursor, "pos": self.pos,
                "new_doc": self.new_doc, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.pos, self.new_doc, self.offset = state["pos"], bool(state["new_doc"]), 0
        self._units, self._tokens, self._starts = None, [], []
        if self.pos is not None:  # re-read the current unit, then skip what was consumed
            self._units = self._walk(self.epoch, self.cursor, self.pos, self.new_doc)
            if not self._next_unit():
                raise ValueError("the data position in the checkpoint is past the end of the "
                                 "data: did the data files change?")
            self.offset = int(state["offset"])
            if self.offset > len(self._tokens):
                raise ValueError("the data position in the checkpoint does not match the data: "
                                 "did the data files or the tokenizer change?")

    # ------------------------------------------------------------------ reading
    def order(self, epoch: int) -> list[int]:
        idx = list(range(len(self.shards)))
        if self.shuffle:
            random.Random(f"minimax01-data/{self.seed}/{epoch}").shuffle(idx)
        return idx

    def units(self, epoch: int = 0):
        """The units of this split in one epoch, in reading order (for inspection and tests)."""
        for e, _, unit in self._walk(epoch, 0, None, True):
            if e != epoch:
                return
            yield unit

    def _walk(self, epoch: int, cursor: int, pos: int | None, new_doc: bool):
        """(epoch, cursor, unit) of this split from a position on; an epoch that yields nothing
        is an error (the split is empty)."""
        first = True
        while True:
            found = False
            order = self.order(epoch)
            for c in range(cursor, len(order)):
                shard = self.shards[order[c]]
                prev_kept = True
                for unit in shard.units(pos if first and pos is not None else 0):
                    keep = held_out(shard.name, unit.pos, self.fraction) == (self.split == "eval")
                    if keep and (unit.text or unit.tokens):
                        nd = new_doc if first else (unit.new_doc or not prev_kept)
                        first = False
                        found = True
                        yield epoch, c, dataclasses.replace(unit, new_doc=nd)
                    prev_kept = keep
                first = False
            if not self.loop:
                return
            if not found and cursor == 0:
                raise ValueError(f"the {self.split} split of the data has no text")
            epoch, cursor = epoch + 1, 0

    def _next_unit(self) -> bool:
        if self._units is None:
            self._units = self._walk(self.epoch, self.cursor, None, True)
        for epoch, cursor, unit in self._units:
            if unit.tokens is not None:  # rendered already (a conversation): as it is
                toks, learn = list(unit.tokens), list(unit.learn)
            else:
                toks = ([self.bos] if self.bos is not None and unit.new_doc else [])
                toks += self.tok.encode(unit.text)
                if self.eos is not None and unit.ends_doc:
                    toks.append(self.eos)
                learn = None
            if not toks:
                continue
            self.epoch, self.cursor, self.pos, self.new_doc = epoch, cursor, unit.pos, unit.new_doc
            self._tokens, self._starts, self.offset = toks, [False] * len(toks), 0
            self._learn = learn
            self._starts[0] = unit.new_doc
            return True
        return False

    def peek_unit(self) -> tuple[list[int], list[bool]] | None:
        """The unread tokens of the current unit (the next unit once it is used up) and which
        are targets, without consuming them (`consume()` does); None at the end of the stream."""
        if self.offset >= len(self._tokens) and not self._next_unit():
            return None
        toks = self._tokens[self.offset:]
        learn = self._learn[self.offset:] if self._learn is not None else [True] * len(toks)
        return toks, learn

    def consume(self) -> None:
        """Mark the current unit as read."""
        self.offset = len(self._tokens)

    def take(self, n: int) -> tuple[list[int], list[bool]]:
        """Up to `n` tokens and their document-start flags (fewer only at the end of a held-out
        stream)."""
        tokens: list[int] = []
        starts: list[bool] = []
        while len(tokens) < n:
            if self.offset >= len(self._tokens) and not self._next_unit():
                break
            k = min(n - len(tokens), len(self._tokens) - self.offset)
            tokens += self._tokens[self.offset:self.offset + k]
            starts += self._starts[self.offset:self.offset + k]
            self.offset += k
        return tokens, starts

    def unread(self, n: int) -> None:
        """Give back the last `n` tokens taken (they must come from the current unit)."""
        if n > self.offset:
            raise ValueError("cannot unread past the current unit")
        self.offset -= n


class Packer:
    """Rows of `seq_len` tokens from a TokenStream: (input_ids, targets, segment lengths)."""

    def __init__(self, stream: TokenStream, seq_len: int, pad_id: int = 0):
        self.stream, self.seq_len, self.pad_id = stream, seq_len, pad_id

    def next_row(self) -> tuple[list[int], list[int], list[int]] | None:
        """None when the stream is exhausted; a short final row is padded with ignored tokens
        in a segment of their own."""
        t = self.seq_len
        tokens, starts = self.stream.take(t + 1)
        if len(tokens) < 2:
            return None
        if len(tokens) == t + 1:
            self.stream.unread(1)  # the last target is the next row's first input
            n = t
        else:  # the end of a held-out stream: the last token has nothing to predict
            n = len(tokens)
        inputs = tokens[:n]
        targets = [tokens[i + 1] if i + 1 < len(tokens) and not starts[i + 1] else IGNORE_INDEX
                   for i in range(n)]
        lengths, last = [], 0
        for i in range(1, n):
            if starts[i]:
                lengths.append(i - last)
                last = i
        lengths.append(n - last)
        if n < t:  # padding: its own segment, nothing to predict
            inputs += [self.pad_id] * (t - n)
            targets += [IGNORE_INDEX] * (t - n)
            lengths.append(t - n)
        return inputs, targets, lengths


def collate(rows: list[tuple[list[int], list[int], list[int]]]) -> dict:
    """Rows -> one packed sequence [1, R*T] with `cu_seqlens` over every row's segments."""
    ids, labels, cu = [], [], [0]
    for inputs, targets, lengths in rows:
        ids += inputs
        labels += targets
        for n in lengths:
            cu.append(cu[-1] + n)
    labels_t = torch.tensor(labels, dtype=torch.long)[None]
    return {"input_ids": torch.tensor(ids, dtype=torch.long)[None], "labels": labels_t,
            "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
            "num_targets": int((labels_t != IGNORE_INDEX).sum())}
