"""Mixture of experts (SPEC §5, MiniMax-01 §3.1): ONE pipeline for training, expert parallelism
and serving.

    route    router logits -> each token's top-k experts and renormalised weights (fp32)
    plan     count the assignments per expert -- summed over a router group when its counts are
             all-gathered (the paper's global router) -- apply the capacity (token drop, GShard
             priority: first choices before second choices, then token order of the group's
             concatenated batch) and order the kept assignments by (token group, expert)
    run      the experts module computes every kept row, ONE call per MoE forward:
             `exchange.run(compute, rows, counts)` moves rows to where their experts live (here:
             nowhere; all-to-all in parallel/expert_parallel.py) and `compute` is a grouped SwiGLU
             matmul over the local expert weights
    combine  the router-weighted sum of each token's expert outputs; then `pipeline.reduce`

A `MoEPipeline` value is a configuration; the model's MoE block holds one (`moe.pipeline`) and its
code is the same under all of them:

    training       MoEPipeline()                        local counts; token drop in train mode;
                                                        aux loss; routing stats (host syncs)
    expert parallel MoEPipeline(router=RouterGroup(size, cp, rank, gather), exchange=<all-to-all>,
                               token_groups=G)          parallel/expert_parallel.py
    serving        MoEPipeline(sync_free=True,          dropless, no stats, no aux loss and no
                               aux_loss=False)          host syncs, so a decode step is CUDA-graph
                                                        capturable (infer/prepare.py)

Seams, and what plugs into them without touching the model:

* `RouterGroup.gather(t) -> [size, *t.shape]`: how this rank's per-(choice, row, expert) counts
  become the router group's. Capacity, drop decisions, load statistics and the aux loss all come
  from the gathered counts, so every rank decides alone which of its own assignments survive.
* `Exchange.run(compute, x, counts) -> y`: x [M, H] rows grouped by (token group, expert), counts
  [G, E] rows per block (E = all experts), y in x's row order; `compute(x_local, counts_local)`
  is the grouped matmul over the experts this rank holds. `LocalExchange` (identity) here,
  `parallel.expert_parallel.AllToAll` for expert parallelism (it overlaps the all-to-all of one
  token group with the compute of another). Expert tensor parallelism wraps either exchange
  (`parallel.expert_parallel.ExpertTensorParallel`): `compute` becomes the ETP group's
  all-gather of rows, the SwiGLU over this rank's slice of the intermediate dim, and the
  reduce-scatter of the partial outputs (`pipelined` overlaps them across token groups).
* The experts module (model/layers.py `Experts`): `experts(x, counts, pipeline) -> y`, called once
  per MoE forward (FSDP's hooks run once per call, however many groups are computed), owning its
  weights and its grouped matmul. **int8 / fp8 weight-only experts** are another module with the
  same call: quantised weights + scales, a quantised grouped matmul as `compute`, the same
  `pipeline.exchange.run(compute, x, counts)`.
* `MoEPipeline.reduce(out) -> out`: applied to the combined [N, H] output. **Tensor-parallel
  experts** (every TP rank holds a slice of every expert's intermediate dim: the matching rows of
  w1 and of w3 -- gate_up_proj viewed as [E, 2, I, H] and split on I -- and the matching columns of
  down_proj) compute partial sums with the same grouped SwiGLU, and `reduce` is the all-reduce over
  the TP group. Combine is linear, so reducing after it moves N x H values instead of N*k x H.
* `MoEPipeline.matmul`: which grouped matmul `swiglu_experts` uses ("grouped" = torch._grouped_mm,
  "loop" = one matmul per expert, "dense" = every expert over every row, sync-free without
  _grouped_mm); None picks per device and dtype.

Losses: `load_balancing_loss` returns this rank's share of its router group's loss (the group's
loss is the sum of its ranks' shares; in one process the share is the loss). How shares and the
lm loss are weighted so that distributed gradients equal one process's: parallel/scaling.py."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MATMULS = ("grouped", "loop", "dense")


# ---------------------------------------------------------------------------------- route
@dataclass
class Routing:
    probs: torch.Tensor    # [N, E] fp32 softmax of the router logits
    weights: torch.Tensor  # [N, k] fp32, renormalised to sum to 1
    experts: torch.Tensor  # [N, k] int64


def route(router_logits: torch.Tensor, top_k: int) -> Routing:
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(probs, weights, experts)


# ---------------------------------------------------------------------------------- plan
def bincount(index: torch.Tensor, length: int) -> torch.Tensor:
    """`torch.bincount(index, minlength=length)` (int64, values < length) without a host sync
    (CUDA's bincount reads the maximum on the host)."""
    out = torch.zeros(length, dtype=torch.int64, device=index.device)
    return out.scatter_add_(0, index.reshape(-1), torch.ones_like(index.reshape(-1)))


def expert_counts(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert (int64 [E])."""
    return bincount(experts, num_experts)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


@dataclass(frozen=True)
class RouterGroup:
    """Ranks whose tokens share capacity, load statistics and the aux loss (the paper's global
    router): `size` consecutive ranks, data index major and cp index minor (`cp` consecutive ranks
    hold slices of the same rows); this rank is `rank` in it. `gather(t) -> [size, *t.shape]`
    all-gathers a count tensor over the group (None for one rank)."""

    size: int = 1
    cp: int = 1
    rank: int = 0
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class Plan:
    order: torch.Tensor    # [M] kept assignments as token * k + choice, grouped by (group, expert)
    counts: torch.Tensor   # [G, E] kept rows per (token group, expert)
    load: torch.Tensor     # [E] assignments routed to each expert over the router group
    num_tokens: int        # tokens over the router group
    capacity: int | None   # None: dropless

    def dropped(self) -> torch.Tensor | int:
        """Assignments over capacity in the router group (a 0-dim tensor; 0 when dropless, so
        reading it costs no host sync)."""
        if self.capacity is None:
            return 0
        return (self.load - self.capacity).clamp(min=0).sum()


def plan(experts: torch.Tensor, num_experts: int, *, rows: int = 1,
         capacity_factor: float | None = None, router: RouterGroup = RouterGroup(),
         token_groups: int = 1, sync_free: bool = False, capacity: int | None = None) -> Plan:
    """The dispatch plan for this rank's assignments `experts` [N, k] (its N tokens are `rows`
    rows of equal length, which sets the priority order across the ranks of a CP group).
    `capacity` overrides the one `capacity_factor` gives. `sync_free`: refuse anything that
    needs the host (the serving configuration)."""
    n, k = experts.shape
    e = num_experts
    dropless = capacity_factor is None and capacity is None
    if sync_free and (not dropless or router.size > 1 or token_groups > 1):
        raise ValueError("the sync-free (serving) MoE pipeline is local and dropless: a capacity, "
                         "a router group or token groups need host syncs")
    if n % rows:
        raise ValueError(f"MoE got {n} tokens, not a multiple of the batch rows {rows}")
    if router.size == 1 and dropless and token_groups == 1:
        # local and dropless (training without drop, eval, serving): a stable sort is the plan
        flat = experts.reshape(-1)                 # token-major: a = token * k + choice
        load = bincount(flat, e)
        return Plan(torch.argsort(flat, stable=True), load[None], load, n, None)
    dev = experts.device
    expert = experts.t().reshape(-1)               # choice-major: a = choice * n + token
    token = torch.arange(n, device=dev).repeat(k)
    choice = torch.arange(k, device=dev).repeat_interleave(n)
    bucket = (choice * rows + token // max(n // rows, 1)) * e + expert   # (choice, row, expert)
    local = bincount(bucket, k * rows * e)
    gathered = router.gather(local) if router.size > 1 else local[None]  # [S, k*rows*e]
    load = gathered.view(router.size, k * rows, e).sum((0, 1))
    n_group = n * router.size
    idx = torch.arange(n * k, device=dev)
    if capacity is None and capacity_factor is not None:
        capacity = expert_capacity(n_group, k, e, capacity_factor)
    if capacity is not None:
        # assignments of the whole group ahead of each of this rank's buckets in the priority
        # order (choice, data rank, row, cp rank, token): an exclusive cumsum over that order
        g = gathered.view(router.size // router.cp, router.cp, k, rows, e).permute(2, 0, 3, 1, 4)
        blocks = g.reshape(-1, e)
        before = (blocks.cumsum(0) - blocks).view(g.shape)
        d, c = divmod(router.rank, router.cp)
        offset = before[:, d, :, c, :].reshape(-1)
        by_bucket = torch.argsort(bucket, stable=True)
        first = torch.cumsum(local, 0) - local
        pos = torch.empty_like(bucket)             # rank of each assignment inside its bucket
        pos[by_bucket] = torch.arange(bucket.numel(), device=dev) - first[bucket[by_bucket]]
        idx = idx[offset[bucket] + pos < capacity]
    groups = max(1, min(token_groups, n))
    key = (token[idx] * groups // max(n, 1)) * e + expert[idx]         # (token group, expert)
    idx = idx[torch.argsort(key, stable=True)]
    counts = bincount(key, groups * e).view(groups, e)
    return Plan(token[idx] * k + choice[idx], counts, load, n_group, capacity)


# ---------------------------------------------------------------------------------- run
def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return x.dtype


def default_matmul(x: torch.Tensor, sync_free: bool = False) -> str:
    """torch._grouped_mm for bf16 on CUDA; otherwise a loop over experts (host sync on the
    counts) or, sync-free, every expert over every row."""
    if x.is_cuda and _compute_dtype(x) == torch.bfloat16 and hasattr(torch, "_grouped_mm"):
        return "grouped"
    return "dense" if sync_free else "loop"


_MM_ALIGN = 8  # elements of 2 bytes in 16: the stride unit torch._grouped_mm requires


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor,
               impl: str = "loop", offs: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K] rows grouped by expert (counts [E]); w: [E, N, K] (nn.Linear layout). Returns
    [M, N], row block e multiplied by w[e]^T. "grouped" and "dense" never read the counts on the
    host. Under CUDA autocast (fp32 weights, bf16 compute: training) the operands are cast to the
    autocast dtype. `offs`: "grouped"'s int32 cumsum of the counts, when the caller has it."""
    if impl == "grouped":
        dtype = _compute_dtype(x)
        if offs is None:
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
        x, w = x.to(dtype), w.to(dtype)
        n, k = w.shape[1], w.shape[2]
        pad_n, pad_k = -n % _MM_ALIGN, -k % _MM_ALIGN
        if pad_n or pad_k:  # _grouped_mm needs 16-byte strides: zero-pad N and K, slice N back
            x = F.pad(x, (0, pad_k))
            w = F.pad(w, (0, pad_k, 0, pad_n))
        y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
        return y[:, :n] if pad_n else y
    if impl == "dense":
        row = torch.arange(x.shape[0], device=x.device)
        expert = torch.searchsorted(torch.cumsum(counts, 0), row, right=True)
        expert = expert.clamp(max=w.shape[0] - 1)
        y = torch.einsum("mk,enk->emn", x, w.to(x.dtype))          # [E, M, N]
        return y.gather(0, expert[None, :, None].expand(1, -1, y.shape[-1]))[0]
    if impl != "loop":
        raise ValueError(f"unknown grouped matmul {impl!r}; choose from {MATMULS}")
    outs = [xe @ w[e].t() for e, xe in enumerate(torch.split(x, counts.tolist())) if xe.shape[0]]
    return torch.cat(outs, 0) if outs else x.new_zeros(0, w.shape[1])


def swiglu_experts(x: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor,
                   down: torch.Tensor, impl: str | None = None,
                   sync_free: bool = False) -> torch.Tensor:
    """x: [M, H] grouped by expert (counts [E]); gate_up: [E, 2I, H] (w1 rows then w3 rows);
    down: [E, H, I]. With no rows the result still depends on x and the weights, so a rank with
    nothing to compute runs the backward collectives (FSDP, all-to-all) like every other."""
    impl = impl or default_matmul(x, sync_free)
    offs = torch.cumsum(counts, 0, dtype=torch.int32) if impl == "grouped" else None  # once
    h = grouped_mm(x, gate_up, counts, impl, offs)
    g, u = h.chunk(2, dim=-1)
    y = grouped_mm(F.silu(g) * u, down, counts, impl, offs)
    if x.shape[0] == 0 and torch.is_grad_enabled():
        y = y + (x.sum() + gate_up.sum() + down.sum()).to(y.dtype) * 0
    return y


def pipelined(compute, blocks):
    """Yield `compute(x, counts)` for each (x, counts) of `blocks` (consumed lazily), in order.
    A compute that communicates (expert tensor parallel: parallel/expert_parallel.py) has
    `start(x, counts) -> pending` and `finish(pending) -> y`; block g + 1 is started before
    block g finishes, so its collectives overlap block g's matmuls."""
    start = getattr(compute, "start", None)
    if start is None:
        for x, counts in blocks:
            yield compute(x, counts)
        return
    pending = None
    for x, counts in blocks:
        nxt = start(x, counts)
        if pending is not None:
            yield compute.finish(pending)
        pending = nxt
    if pending is not None:
        yield compute.finish(pending)


class LocalExchange:
    """The identity exchange: every expert is on this rank. One compute call per token group."""

    def run(self, compute, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if counts.shape[0] == 1 and not hasattr(compute, "start"):
            return compute(x, counts[0])
        parts = torch.split(x, counts.sum(1).tolist())
        return torch.cat(list(pipelined(compute, zip(parts, counts))))


LOCAL = LocalExchange()


@dataclass(frozen=True)
class MoEPipeline:
    """One configuration of the pipeline (see the module docstring)."""

    router: RouterGroup = RouterGroup()
    exchange: object = LOCAL            # .run(compute, x, counts) -> y
    token_groups: int = 1               # > 1: overlap groups for an exchange that communicates
    sync_free: bool = False             # no host syncs: dropless, no stats
    aux_loss: bool = True               # False: no load-balancing loss (serving: fewer kernels
                                        # per decode step), and no training through it
    matmul: str | None = None           # grouped matmul of swiglu_experts; None: per device
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None  # on the combined output

    def compute(self, gate_up: torch.Tensor, down: torch.Tensor):
        """The default experts' compute over their local weights."""
        impl, sync_free = self.matmul, self.sync_free
        return lambda x, counts: swiglu_experts(x, counts, gate_up, down, impl, sync_free)


TRAINING = MoEPipeline()
SERVING = MoEPipeline(sync_free=True, aux_loss=False)


# ---------------------------------------------------------------------------------- combine
def combine(expert_out: torch.Tensor, order: torch.Tensor, weights: torch.Tensor,
            num_tokens: int) -> torch.Tensor:
    """Weighted sum of each token's expert outputs. expert_out rows follow `order` (flat
    token*k + choice indices, each at most once); dropped assignments simply have no row.
    Scatters rows back to [N, k, H] (unique indices: no atomics) and sums over k."""
    k = weights.shape[1]
    w = weights.reshape(-1)[order].to(expert_out.dtype)
    slots = expert_out.new_zeros(num_tokens * k, expert_out.shape[-1])
    slots = slots.index_copy(0, order, expert_out * w[:, None])
    return slots.view(num_tokens, k, -1).sum(1)


def load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Switch/Mixtral form E * sum_e f_e P_e, f_e = assignments to e / tokens (sums to k), P_e =
    mean router probability of e; uniform routing gives k. `counts` and `num_tokens` cover the
    router group, `probs` [n, E] this rank's tokens: the result is this rank's share
    E * sum_e f_e * (sum of its probs of e) / num_tokens, and the shares of the group's ranks sum
    to the group's loss (one process: the loss). The gradient flows through the probs only."""
    num_experts = probs.shape[-1]
    f = counts.float() / max(num_tokens, 1)
    return num_experts * (f * probs.sum(dim=0)).sum() / max(num_tokens, 1)


@dataclass
class MoEStats:
    """Detached routing statistics of one MoE forward over its router group (training logs)."""

    load: torch.Tensor  # [E] fraction of assignments per expert (sums to 1)
    dropped: int        # assignments dropped by the capacity limit
    assignments: int    # tokens * top_k


def moe_pipeline(x: torch.Tensor, routing: Routing, experts, pipeline: MoEPipeline = TRAINING, *,
                 capacity_factor: float | None = None, rows: int = 1):
    """route (done by the caller) -> plan -> run -> combine for tokens x [N, H]. `experts` is
    the experts module: `experts(rows, counts, pipeline) -> outputs`. Returns (out [N, H] in x's
    dtype, this rank's aux-loss share (0 without `pipeline.aux_loss`), MoEStats or None when
    sync-free)."""
    n, k = routing.experts.shape
    if not pipeline.aux_loss and torch.is_grad_enabled() and x.requires_grad:
        raise ValueError("this MoE pipeline computes no aux loss (the serving configuration): "
                         "it is not for training; restore the training pipeline first "
                         "(the function prepare_for_serving returned, or Engine.close())")
    p = plan(routing.experts, routing.probs.shape[-1], rows=rows, capacity_factor=capacity_factor,
             router=pipeline.router, token_groups=pipeline.token_groups,
             sync_free=pipeline.sync_free)
    y = experts(x[p.order // k], p.counts, pipeline)
    out = combine(y, p.order, routing.weights, n)
    if pipeline.reduce is not None:
        out = pipeline.reduce(out)
    if pipeline.aux_loss:
        aux = load_balancing_loss(routing.probs, p.load, p.num_tokens)
    else:
        aux = routing.probs.new_zeros(())
    stats = None
    if not pipeline.sync_free:
        stats = MoEStats(load=(p.load.float() / max(p.num_tokens * k, 1)).detach(),
                         dropped=int(p.dropped()), assignments=p.num_tokens * k)
    return out.to(x.dtype), aux, stats


# ---------------------------------------------------------------------------------- one process
@dataclass
class Dispatch:
    order: torch.Tensor    # [M] flat token * k + choice indices, grouped by expert
    counts: torch.Tensor   # [E] kept assignments per expert
    dropped: int           # assignments over capacity (contribute 0)


def dispatch(experts: torch.Tensor, num_experts: int, capacity: int | None = None) -> Dispatch:
    """One process's plan with a given capacity (analysis and tests): each expert keeps its first
    `capacity` assignments in the GShard priority order."""
    p = plan(experts, num_experts, capacity=capacity)
    return Dispatch(p.order, p.counts[0], int(p.dropped()))
