"""What context-parallel attention needs to know about one forward pass.

Under context parallelism (CP) every rank of a CP group holds one contiguous slice of the same
rows: rank c holds tokens [c*T_l, (c+1)*T_l) of every row. Documents may cross slice
boundaries. The model gets *global* position ids (position inside each document), so the
document structure of the whole sequence follows from them: a document starts where the position
does not continue the previous token's. `cp_context` all-gathers the position ids the model's
`AttnContext` carries, once per forward (the result is kept in the context's `plans`, which every
layer of that forward shares); LASP+ and ring attention read the structure from it."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

from .collectives import all_gather_nograd


@dataclass(frozen=True)
class CPGroup:
    """The CP process group and this rank's place in it (fixed for a run)."""

    group: object
    rank: int
    size: int


def cp_context(ctx, cp: CPGroup) -> "CPContext":
    """The CPContext of the forward whose model-level `AttnContext` is `ctx`: gathered on the
    first call (every CP rank runs the same layers in the same order, so every rank of the group
    makes this collective at the same point), then read from `ctx.plans`. Refuses what context
    parallelism cannot compute instead of computing something else."""
    plan = ctx.plans.get("cp")
    if plan is None:
        if ctx.cache is not None:
            raise ValueError("cached generation is not supported under context parallelism")
        if ctx.valid is not None:
            raise ValueError("padding is not supported under context parallelism")
        if ctx.position_ids is None:
            raise ValueError("under context parallelism the model needs the global position_ids "
                             "of its slice: pass the batch through world.shard_batch and give all "
                             "its keys to the model")
        plan = ctx.plans["cp"] = CPContext.gather(cp.group, cp.rank, cp.size, ctx.position_ids)
    return plan


@dataclass
class CPContext:
    group: object          # the CP process group
    rank: int
    size: int
    local_len: int         # T_l, tokens per row on every rank
    rows: int              # B
    starts: list[int]      # global indices where a document starts (sorted, starts with 0)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def total_len(self) -> int:
        return self.local_len * self.size

    @classmethod
    def gather(cls, group, rank: int, size: int, position_ids: torch.Tensor) -> "CPContext":
        """Build from this rank's slice of global position ids ([B, T_l] or [T_l]); every rank
        of the group calls it (one all-gather)."""
        pos = position_ids if position_ids.dim() == 2 else position_ids[None]
        rows, local_len = pos.shape
        full = all_gather_nograd(pos.to(torch.int64), group)  # [C, B, T_l]
        full = full.permute(1, 0, 2).reshape(rows, size * local_len).cpu()
        starts = torch.ones_like(full, dtype=torch.bool)
        starts[:, 1:] = full[:, 1:] != full[:, :-1] + 1
        if rows > 1 and not bool((starts == starts[:1]).all()):
            raise ValueError("context parallelism with batch size > 1 needs the same document "
                             "layout in every row; pack documents into rows of batch size 1 "
                             "(cu_seqlens) instead")
        return cls(group, rank, size, local_len, rows, starts[0].nonzero()[:, 0].tolist())

    @classmethod
    def from_starts(cls, starts: list[int], rank: int, size: int, local_len: int, rows: int = 1,
                    group=None) -> "CPContext":
        """For tests and single-process planning: the structure given directly."""
        return cls(group, rank, size, local_len, rows, sorted(set([0] + list(starts))))

    # ------------------------------------------------------------------ queries
    def doc_start_at_or_before(self, t: int) -> int:
        """Start index of the document that holds global token t."""
        return self.starts[bisect.bisect_right(self.starts, t) - 1]

    def next_start_after(self, t: int, limit: int) -> int:
        """First document start in (t, limit), else limit."""
        i = bisect.bisect_right(self.starts, t)
        return min(self.starts[i], limit) if i < len(self.starts) else limit

    def has_start_in(self, lo: int, hi: int) -> bool:
        """True when a document starts at some index in [lo, hi)."""
        i = bisect.bisect_left(self.starts, lo)
        return i < len(self.starts) and self.starts[i] < hi

    def segments(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The document pieces that tile [lo, hi), as (start, end) global indices."""
        cuts = [lo] + [s for s in self.starts[bisect.bisect_right(self.starts, lo):
                                              bisect.bisect_left(self.starts, hi)]] + [hi]
        return list(zip(cuts[:-1], cuts[1:]))

    def cached(self, key, build):
        """Plans shared by all layers of one forward (computed once)."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]
