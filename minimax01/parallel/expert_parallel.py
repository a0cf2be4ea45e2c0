"""Expert parallelism (MiniMax-01 §3.1) as a configuration of the one MoE pipeline (ops/moe.py).

Under it every MoE block computes what one process computes over the tokens of a whole *router
group* of ranks (by default every rank: then a distributed micro-step equals one process on the
concatenated micro-batches). Two pieces plug into the pipeline, nothing into the model:

* The global router (`router_group`): each rank counts its assignments per (choice, row, expert)
  and the counts are all-gathered over the router group (one small collective). Capacity is
  ceil(capacity_factor * group_tokens * k / E) and the drop priority is the single-device one
  (first choices before second choices, then token order of the concatenated batch), so each
  rank decides alone which of its assignments survive; the aux loss and the routing statistics
  use the group's counts.
* The all-to-all exchange (`AllToAll`, with ep > 1): kept rows, grouped by expert, go to the
  rank that holds the expert (autograd-aware all-to-all); the receiver regroups them by its local
  experts for the grouped matmul, and the results travel back the same way. Overlap: with
  `token_groups` > 1 all groups' dispatches are issued first (asynchronous functional
  collectives), then each group's compute runs while later groups are still in flight, and each
  group's return overlaps the next group's compute -- all inside the experts module's one call,
  so FSDP unshards the expert weights once per MoE forward.

Expert tensor parallelism (`ExpertTensorParallel`, with etp > 1) wraps either exchange: each
expert's intermediate dim is split over the `etp` ranks of an ETP group (w1 and w3 by rows of
gate_up_proj -- its [w1; w3] halves split alike --, w2 by columns of down_proj). Every rank
computes with its slice over the rows of the whole ETP group (all-gathered after the EP
dispatch), and the partial outputs are summed back onto the rows' rank by a reduce-scatter:
SwiGLU is elementwise in the intermediate dim and w2 is linear, so the sum of the slices'
outputs is the expert's output. With token groups, group g + 1's all-gather is issued before
group g's matmuls (ops/moe.py `pipelined`).

Expert weights are split over the EP (and ETP) ranks by fsdp.shard_experts (DTensors with global shapes;
the experts module computes with the local shard). The aux loss is the rank's share of its
router group's (ops/moe.py); how it is weighted: parallel/scaling.py."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from ..ops.moe import LOCAL, MoEPipeline, RouterGroup, pipelined
from .collectives import all_gather_async, all_gather_nograd, all_to_all, reduce_scatter, wait


def router_group(group, size: int = 1, cp: int = 1, rank: int = 0) -> RouterGroup:
    """The pipeline's RouterGroup over a process group (`size` consecutive ranks, data index
    major, cp index minor; this rank is `rank` in it)."""
    gather = partial(all_gather_nograd, group=group) if size > 1 else None
    return RouterGroup(size=size, cp=cp, rank=rank, gather=gather)


@dataclass
class EPGroup:
    """The expert-parallel process group: rank j of `size` holds experts [j*E/size, (j+1)*E/size)."""

    group: object | None
    size: int = 1
    rank: int = 0


class AllToAll:
    """The pipeline's exchange under expert parallelism (see the module docstring)."""

    def __init__(self, ep: EPGroup):
        self.ep = ep

    def run(self, compute, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, H] grouped by (token group, global expert), counts [G, E]; compute(rows,
        local_counts) runs the grouped matmul over this rank's experts."""
        ep = self.ep
        e = counts.shape[1]
        per = e // ep.size
        mine = slice(ep.rank * per, (ep.rank + 1) * per)
        everyone = all_gather_nograd(counts, ep.group).cpu()  # [ep, G, E]
        parts = torch.split(x, everyone[ep.rank].sum(1).tolist())
        sends, routes = [], []
        for g, part in enumerate(parts):
            in_splits = everyone[ep.rank, g].view(ep.size, per).sum(1).tolist()
            recv = everyone[:, g, mine]  # [ep (source), per]
            out_splits = recv.sum(1).tolist()
            sends.append(all_to_all(part, out_splits, in_splits, ep.group))
            routes.append((in_splits, out_splits, recv))
        perms = []

        def blocks():
            for got, (_, _, recv) in zip(sends, routes):
                # rows arrive grouped by (source rank, expert); the grouped matmul wants them
                # expert-major
                perm = source_major_to_expert_major(recv).to(x.device)
                perms.append(perm)
                yield got[perm], recv.sum(0).to(x.device)

        backs = []
        for y, perm, (in_splits, out_splits, _) in zip(pipelined(compute, blocks()), perms,
                                                      routes):
            y = torch.empty_like(y).index_copy(0, perm, y)
            backs.append(all_to_all(y, in_splits, out_splits, ep.group))
        return torch.cat(backs)


def source_major_to_expert_major(counts: torch.Tensor) -> torch.Tensor:
    """Rows grouped by (source, expert) with counts [sources, experts] (CPU): the permutation
    that groups them by (expert, source)."""
    sources, per = counts.shape
    seg = torch.repeat_interleave(torch.arange(counts.numel()), counts.reshape(-1))
    return torch.argsort((seg % per) * sources + seg // per, stable=True)


@dataclass
class ETPGroup:
    """The expert-tensor-parallel process group: rank j of `size` holds slice j of every local
    expert's intermediate dim."""

    group: object | None
    size: int = 1
    rank: int = 0


class ETPCompute:
    """The compute of one block under ETP (see the module docstring), in two phases for
    `pipelined`: `start` all-gathers the block's rows over the ETP group (asynchronously),
    `finish` runs the partial SwiGLU and reduce-scatters the partial outputs."""

    def __init__(self, compute, etp: ETPGroup):
        self.compute, self.etp = compute, etp

    def __call__(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return self.finish(self.start(x, counts))

    def start(self, x: torch.Tensor, counts: torch.Tensor):
        """x [m, H] grouped by local expert, counts [per]."""
        etp = self.etp
        everyone = all_gather_nograd(counts, etp.group).cpu()  # [etp, per]
        sizes = everyone.sum(1).tolist()
        width = max(max(sizes), 1)  # every rank's rows, padded to one length
        padded = torch.cat([x, x.new_zeros(width - x.shape[0], x.shape[1])])
        return all_gather_async(padded, etp.group), everyone, sizes, width, x.shape[0]

    def finish(self, pending) -> torch.Tensor:
        gathered, everyone, sizes, width, m = pending
        gathered = wait(gathered)                                     # [etp, width, H]
        rows = torch.cat([gathered[j, :n] for j, n in enumerate(sizes)])
        perm = source_major_to_expert_major(everyone).to(rows.device)
        y = self.compute(rows[perm], everyone.sum(0).to(rows.device))  # partial sums
        y = torch.empty_like(y).index_copy(0, perm, y)
        slots = torch.cat([torch.arange(n) + j * width for j, n in enumerate(sizes)])
        out = y.new_zeros(self.etp.size * width, y.shape[1]).index_copy(0, slots.to(y.device), y)
        return wait(reduce_scatter(out.view(self.etp.size, width, -1), self.etp.group))[:m]


class ExpertTensorParallel:
    """The pipeline's exchange under expert tensor parallelism: `inner` (LOCAL or AllToAll)
    moves rows to their experts' EP rank, and every block's compute is an `ETPCompute`."""

    def __init__(self, inner, etp: ETPGroup):
        self.inner, self.etp = inner, etp

    def run(self, compute, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return self.inner.run(ETPCompute(compute, self.etp), x, counts)


def expert_parallel_pipeline(router: RouterGroup, ep: EPGroup, token_groups: int = 1,
                             etp: ETPGroup | None = None) -> MoEPipeline:
    """The pipeline configuration: the global router, the all-to-all when ep > 1, expert
    tensor parallelism when etp.size > 1."""
    if not isinstance(token_groups, int) or token_groups < 1:
        raise ValueError(f"ep_token_groups must be a positive integer, got {token_groups!r}")
    exchange = AllToAll(ep) if ep.size > 1 else LOCAL
    if etp is not None and etp.size > 1:
        exchange = ExpertTensorParallel(exchange, etp)
    if exchange is LOCAL:  # every expert is here: nothing to overlap
        return MoEPipeline(router=router, exchange=LOCAL)
    return MoEPipeline(router=router, exchange=exchange, token_groups=token_groups)


def apply_expert_parallel(model: torch.nn.Module, router: RouterGroup, ep: EPGroup,
                          token_groups: int = 1, etp: ETPGroup | None = None) -> None:
    """Put every MoE block of `model` on the expert-parallel pipeline (weights untouched: see
    fsdp.shard_experts)."""
    pipeline = expert_parallel_pipeline(router, ep, token_groups, etp)
    for layer in model.model.layers:
        layer.mlp.pipeline = pipeline
