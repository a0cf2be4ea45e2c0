"""The tensor-parallel plug-ins for inference: what replaces or hooks a module of the
single-device model so that N ranks, each holding its slice (parallel/tp_plan.py), compute the
single-device function with ONE collective per sub-layer:

    embedding     VocabParallelEmbedding   its vocab rows, zeros elsewhere -> all-reduce
    lightning     TPLightningNorm + FusedNormReduce on out_proj: the output RMSNorm runs over
                  all H*d features although a rank holds H/N*d of them. The norm is a per-token
                  scalar r = rsqrt(sum of squares / (H*d) + eps) times the weight, and out_proj is
                  linear, so out_proj(gate * w * x * r) = r * out_proj(gate * w * x): each rank
                  sends its out_proj partial AND its sum of squares in ONE fp32 all-reduce
                  [T, h + 1], then scales by r. (`fused_norm=False` uses tp_norm.tp_rms_norm
                  instead: the norm's own all-reduce, then out_proj's.)
    softmax       ReduceOutput on o_proj (heads split, KV heads split or replicated)
    MoE           the pipeline's `reduce` (ops/moe.py): experts split along the intermediate dim
                  (partial sums) or whole experts per rank (`LocalExperts`, expert parallel)
    lm_head       VocabParallelHead: its vocab columns -> all-gather -> the full logits on
                  every rank (sampling reads them on rank 0)

Every collective goes through one `TPGroup`, which counts them (tests assert the count per
forward). Inference only: nothing here is differentiable."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .tp_norm import tp_rms_norm


class TPGroup:
    """The tensor-parallel process group as the plug-ins use it (size 1: no collectives)."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        on = dist.is_available() and dist.is_initialized()
        self.group = group
        self.size = dist.get_world_size(group) if on else 1
        self.rank = dist.get_rank(group) if on else 0
        self.counts = {"all_reduce": 0, "all_gather": 0}
        # benchmarks only (benchmarks/tp_serving.py): `skip` computes without communicating
        # (wrong results) to measure the collectives' share of a step; `always` runs the
        # collectives even in a group of one (NCCL inside CUDA graphs, on one GPU)
        self.skip = False
        self.always = False

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place; returns x."""
        if self.size > 1 or self.always:
            self.counts["all_reduce"] += 1
            if not self.skip:
                dist.all_reduce(x, group=self.group)
        return x

    def all_gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, ...] of every rank stacked: [size, M, ...]."""
        if self.size == 1 and not self.always:
            return x[None]
        self.counts["all_gather"] += 1
        if self.skip:
            return x[None].expand(self.size, *x.shape)
        out = x.new_empty((self.size * x.shape[0], *x.shape[1:]))
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, x.contiguous(), group=self.group)
        return out.view(self.size, *x.shape)

    def reset_counts(self) -> None:
        self.counts = dict.fromkeys(self.counts, 0)


def vocab_range(vocab: int, tp: int, rank: int) -> tuple[int, int, int]:
    """(first row, rows, padded rows per rank) of rank's vocab shard (tp_plan's split)."""
    per = -(-vocab // tp)
    start = min(rank * per, vocab)
    return start, min(start + per, vocab) - start, per


class VocabParallelEmbedding(nn.Module):
    """`weight` holds vocab rows [start, start + rows); ids elsewhere embed to zeros on this rank,
    so the sum over ranks is the embedding (exact: one non-zero term)."""

    def __init__(self, vocab: int, hidden: int, tp: TPGroup, device=None, dtype=None):
        super().__init__()
        self.tp = tp
        self.start, self.rows, self.padded = vocab_range(vocab, tp.size, tp.rank)
        self.weight = nn.Parameter(torch.empty(self.rows, hidden, device=device, dtype=dtype),
                                   requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        inside = (local >= 0) & (local < self.rows)
        if self.rows:
            e = F.embedding(local.clamp(0, self.rows - 1), self.weight)
            e = e * inside[..., None].to(e.dtype)
        else:
            e = self.weight.new_zeros(*ids.shape, self.weight.shape[1])
        return self.tp.all_reduce(e)

    def extra_repr(self) -> str:
        return f"rows [{self.start}, {self.start + self.rows}) of the vocabulary"


class VocabParallelHead(nn.Module):
    """lm_head over this rank's vocab rows; the ranks' logits are all-gathered into [..., V]."""

    def __init__(self, vocab: int, hidden: int, tp: TPGroup, device=None, dtype=None):
        super().__init__()
        self.tp, self.vocab = tp, vocab
        self.start, self.rows, self.padded = vocab_range(vocab, tp.size, tp.rank)
        self.weight = nn.Parameter(torch.empty(self.rows, hidden, device=device, dtype=dtype),
                                   requires_grad=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        lead = h.shape[:-1]
        flat = h.reshape(-1, h.shape[-1])
        if flat.shape[0] == 0:  # every rank has the same shapes: all skip the collective
            return h.new_zeros(*lead, self.vocab)
        y = F.linear(flat, self.weight)
        if self.rows < self.padded:
            y = F.pad(y, (0, self.padded - self.rows))
        parts = self.tp.all_gather_rows(y)                      # [N, M, padded]
        full = parts.permute(1, 0, 2).reshape(flat.shape[0], -1)[:, :self.vocab]
        return full.reshape(*lead, self.vocab)

    def extra_repr(self) -> str:
        return f"rows [{self.start}, {self.start + self.rows}) of {self.vocab}"


class TPLightningNorm(nn.Module):
    """The lightning output norm over the full width `full_width` from this rank's features
    (weight: the same slice of the norm weight). fused: returns weight * x and leaves the sum
    of squares in `pending` for FusedNormReduce on out_proj; else tp_norm.tp_rms_norm."""

    def __init__(self, width: int, full_width: int, eps: float, tp: TPGroup, fused: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.tp, self.eps, self.full_width, self.fused = tp, eps, full_width, fused
        self.weight = nn.Parameter(torch.ones(width, device=device, dtype=dtype),
                                   requires_grad=False)
        self.pending: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            if self.tp.size > 1:
                self.tp.counts["all_reduce"] += 1
            return tp_rms_norm(x, self.weight, self.eps, self.full_width,
                               self.tp.group if self.tp.size > 1 else None)
        xf = x if x.dtype == torch.float64 else x.float()
        self.pending = xf.pow(2).sum(-1, keepdim=True)
        return self.weight * x

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[0]} of {self.full_width} features, eps={self.eps}, "
                f"fused={self.fused}")


class FusedNormReduce:
    """Forward hook on a lightning layer's out_proj (see the module docstring): one fp32
    all-reduce of [partial out_proj output | sum of squares], then the norm's scalar."""

    def __init__(self, tp: TPGroup, norm: TPLightningNorm):
        self.tp, self.norm = tp, norm

    def __call__(self, module, inputs, y: torch.Tensor) -> torch.Tensor:
        sumsq, self.norm.pending = self.norm.pending, None
        if sumsq is None:
            raise RuntimeError("FusedNormReduce: out_proj ran without the lightning norm before it")
        acc = torch.float64 if y.dtype == torch.float64 else torch.float32
        buf = self.tp.all_reduce(torch.cat([y.to(acc), sumsq.to(acc)], -1))
        r = torch.rsqrt(buf[..., -1:] / self.norm.full_width + self.norm.eps)
        return (buf[..., :-1] * r).to(y.dtype)


class ReduceOutput:
    """Forward hook: the module's output (a partial sum of a row-parallel matmul) summed over the
    ranks."""

    def __init__(self, tp: TPGroup):
        self.tp = tp

    def __call__(self, module, inputs, y: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(y)


class LocalExperts:
    """The MoE pipeline's exchange under expert parallelism at inference: every rank sees every
    token (activations are replicated under TP) and holds experts [first, first + count) whole;
    it computes the rows routed to them, zeros elsewhere, and the pipeline's `reduce` sums the
    ranks. Rows are grouped by expert, so its rows are one block: cut on the host (CPU), or
    sync-free (CUDA graphs): the block's rows gathered to the front, the grouped matmul run with
    the local counts (rows past their sum are ignored), the block scattered back."""

    def __init__(self, first: int, count: int, sync_free: bool | None = None):
        self.first, self.count, self.sync_free = first, count, sync_free

    def run(self, compute, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if counts.shape[0] != 1:
            raise ValueError("expert parallel inference runs one token group")
        c = counts[0]
        local = c[self.first:self.first + self.count]
        sync_free = x.is_cuda if self.sync_free is None else self.sync_free
        m = x.shape[0]
        if not sync_free:
            start, n = int(c[:self.first].sum()), int(local.sum())
            out = x.new_zeros(x.shape)
            if n:
                out[start:start + n] = compute(x[start:start + n], local)
            return out
        row = torch.arange(m, device=x.device)
        idx = (c[:self.first].sum() + row).clamp(max=max(m - 1, 0))
        y = compute(x[idx], local)
        y = torch.where((row < local.sum())[:, None], y, torch.zeros((), dtype=y.dtype,
                                                                     device=y.device))
        return x.new_zeros(x.shape).index_add_(0, idx, y.to(x.dtype))
