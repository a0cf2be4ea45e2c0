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

Expert weights are split over the EP ranks by fsdp.shard_experts (DTensors with global shapes;
the experts module computes with the local shard). The aux loss is the rank's share of its
router group's (ops/moe.py); how it is weighted: parallel/scaling.py."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from ..ops.moe import LOCAL, MoEPipeline, RouterGroup
from .collectives import all_gather_nograd, all_to_all


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
        backs = []
        for got, (in_splits, out_splits, recv) in zip(sends, routes):
            # rows arrive grouped by (source rank, expert); the grouped matmul wants expert-major
            seg = torch.repeat_interleave(torch.arange(recv.numel()), recv.reshape(-1))
            perm = torch.argsort((seg % per) * ep.size + seg // per, stable=True).to(x.device)
            y = compute(got[perm], recv.sum(0).to(x.device))
            y = torch.empty_like(y).index_copy(0, perm, y)
            backs.append(all_to_all(y, in_splits, out_splits, ep.group))
        return torch.cat(backs)


def expert_parallel_pipeline(router: RouterGroup, ep: EPGroup,
                             token_groups: int = 1) -> MoEPipeline:
    """The pipeline configuration: the global router, and the all-to-all when ep > 1."""
    if not isinstance(token_groups, int) or token_groups < 1:
        raise ValueError(f"ep_token_groups must be a positive integer, got {token_groups!r}")
    if ep.size == 1:  # every expert is here: nothing to overlap
        return MoEPipeline(router=router, exchange=LOCAL)
    return MoEPipeline(router=router, exchange=AllToAll(ep), token_groups=token_groups)


def apply_expert_parallel(model: torch.nn.Module, router: RouterGroup, ep: EPGroup,
                          token_groups: int = 1) -> None:
    """Put every MoE block of `model` on the expert-parallel pipeline (weights untouched: see
    fsdp.shard_experts)."""
    pipeline = expert_parallel_pipeline(router, ep, token_groups)
    for layer in model.model.layers:
        layer.mlp.pipeline = pipeline
