"""A data mixture by document length (the paper's long-context recipe: each context-extension
stage draws fixed shares of its tokens from short, medium and long documents).

`data.length_mixture = [[lo, hi, weight], ...]`: documents whose length in tokens lies in
[lo, hi) form a bucket (hi may be `inf`); every packed row comes whole from one bucket, drawn with
probability weight / sum(weights) by a hash of (seed, row number), so the token shares follow the
weights and the draw needs no state. Each bucket is its own TokenStream over a filtered view of
the source, so the whole mixture resumes exactly from (rows drawn, every bucket's position).

A document's length is its token count under the run's tokenizer (text files: the whole file,
measured once per run); the synthetic source is refused (its examples all have one length)."""

from __future__ import annotations

import random

from ..config import check_mixture  # the spec's checks live with the schema
from .packing import Packer, TokenStream
from .sources import TextFile


class _LengthView:
    """The documents of one shard whose token length lies in [lo, hi)."""

    def __init__(self, shard, lo: float, hi: float, measure, file_lengths: dict):
        self.shard, self.name, self.lo, self.hi = shard, shard.name, lo, hi
        self.measure, self.file_lengths = measure, file_lengths

    def _keep(self, n: int) -> bool:
        return self.lo <= n < self.hi

    def units(self, start: int = 0):
        if isinstance(self.shard, TextFile):  # one document in pieces: measure the whole file
            if self.name not in self.file_lengths:
                self.file_lengths[self.name] = sum(self.measure(u.text) for u in self.shard.units(0))
            if self._keep(self.file_lengths[self.name]):
                yield from self.shard.units(start)
            return
        for unit in self.shard.units(start):  # every unit is a whole document
            if self._keep(self.measure(unit.text)):
                yield unit


class LengthMixture:
    """Rows of `seq_len` tokens drawn bucket by bucket; the `Packer` + TokenStream interface the
    trainer's data uses (`next_row`, `state_dict`, `load_state_dict`)."""

    def __init__(self, shards: list, tokenizer, spec, seq_len: int, pad_id: int, seed: int,
                 eval_fraction: float, shuffle: bool, add_bos: bool, add_eos: bool):
        if any(getattr(s, "name", None) == "synthetic" for s in shards):
            raise ValueError("data.length_mixture needs a finite source with documents of many "
                             "lengths; synthetic examples all have one length")
        self.buckets = check_mixture(spec)
        self.seed = seed
        self.rows = 0
        lengths: dict = {}
        measure = lambda text: len(tokenizer.encode(text))  # noqa: E731
        self.streams, self.packers = [], []
        for lo, hi, w in self.buckets:
            views = [_LengthView(s, lo, hi, measure, lengths) for s in shards]
            stream = TokenStream(views, tokenizer, "train", eval_fraction, seed, shuffle,
                                 add_bos, add_eos) if w > 0 else None
            self.streams.append(stream)
            self.packers.append(Packer(stream, seq_len, pad_id) if stream else None)
        total = sum(w for *_, w in self.buckets)
        self.cumulative, acc = [], 0.0
        for *_, w in self.buckets:
            acc += w / total
            self.cumulative.append(acc)

    def check(self) -> None:
        """Every bucket with a weight has training text (one line naming the empty one)."""
        for (lo, hi, _), stream in zip(self.buckets, self.streams):
            if stream is None:
                continue
            probe = TokenStream(stream.shards, stream.tok, "train", stream.fraction, stream.seed,
                                stream.shuffle, stream.bos is not None, stream.eos is not None)
            try:
                probe.take(1)
            except ValueError:
                raise ValueError(f"data.length_mixture: no training documents of {lo:g} to "
                                 f"{hi:g} tokens in the source") from None

    def bucket_of_row(self, row: int) -> int:
        u = random.Random(f"minimax01-length-mixture/{self.seed}/{row}").random()
        for i, c in enumerate(self.cumulative):
            if u < c and self.streams[i] is not None:
                return i
        return max(i for i, s in enumerate(self.streams) if s is not None)

    def next_row(self):
        b = self.bucket_of_row(self.rows)
        self.rows += 1
        return self.packers[b].next_row()

    def state_dict(self) -> dict:
        return {"mixture_rows": self.rows,
                "buckets": [s.state_dict() if s is not None else None for s in self.streams]}

    def load_state_dict(self, state: dict) -> None:
        if "mixture_rows" not in state or len(state["buckets"]) != len(self.streams):
            raise ValueError("the data position in the checkpoint is not this length mixture's: "
                             "did data.length_mixture change?")
        self.rows = int(state["mixture_rows"])
        for stream, s in zip(self.streams, state["buckets"]):
            if stream is not None:
                stream.load_state_dict(s)
