"""Expert parallelism for the MoE blocks (MiniMax-01 §3.1): the global router, token drop,
all-to-all dispatch/combine, and overlap of the all-to-all with expert compute.

The dispatcher fills `MoE.dispatcher` and reproduces `MoE.local_forward` computed over the tokens
of a whole *router group* of ranks (by default every data rank: then a distributed micro-step
computes exactly what one process computes on the concatenated micro-batches):

* Global router: every rank counts its assignments per (choice, row, expert) and the counts are
  all-gathered across the router group (one small collective). Capacity is
  ceil(capacity_factor * group_tokens * k / E) and the drop priority is the single-device one
  (first choices before second choices, then token order of the concatenated batch), so each
  rank decides locally which of its assignments survive. The load-balancing loss uses the global
  counts; its gradient flows through the local router probabilities.
* Dispatch: surviving assignments are sorted by expert and sent to the rank that holds the
  expert (`all_to_all`, autograd-aware); the receiver groups rows by expert for the grouped
  matmuls, the results travel back the same way and are summed with the router weights.
* Overlap: tokens are split into `token_groups` groups; all dispatches are issued first
  (asynchronous functional collectives), then each group's expert compute runs while the later
  groups' tokens are still in flight, and each group's combine overlaps the next group's compute.

Loss convention: the returned aux loss is this rank's share scaled so that the *mean over all
ranks* equals the router group's loss (ranks' gradients are averaged by FSDP)."""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from ..model.layers import MoEStats
from ..ops.moe import expert_capacity, swiglu_experts
from .collectives import all_gather_nograd, all_to_all


@dataclass
class RouterGroup:
    """Ranks whose tokens share capacity and load statistics: consecutive ranks
    (dp index major, cp index minor); `cp` ranks hold slices of the same rows."""

    group: object | None
    size: int = 1
    cp: int = 1
    rank: int = 0


@dataclass
class EPGroup:
    group: object | None
    size: int = 1
    rank: int = 0


def _local(w: torch.Tensor) -> torch.Tensor:
    return w.to_local() if isinstance(w, DTensor) else w


def _experts_forward(self, fn):
    """Replaces `Experts.forward` under parallelism: hand the (FSDP-unsharded, EP-local) expert
    weights to `fn`, so FSDP's hooks run once per MoE call however many groups are computed."""
    return fn(_local(self.gate_up_proj), _local(self.down_proj))


def install_experts_forward(experts: torch.nn.Module) -> None:
    experts.forward = types.MethodType(_experts_forward, experts)


def _swiglu(x, counts, w1, w2):
    """Grouped SwiGLU that stays in the autograd graph of x and the weights even with no rows:
    every rank must run the backward collectives that follow."""
    y = swiglu_experts(x, counts, w1, w2)
    if x.shape[0] == 0 and torch.is_grad_enabled():
        y = y + (x.sum() + w1.sum() + w2.sum()).to(y.dtype) * 0
    return y


class ExpertParallel:
    """The callable placed in `MoE.dispatcher`; `state.rows` is the batch size of the current
    forward (set by the world's pre-forward hook)."""

    def __init__(self, state, router: RouterGroup, ep: EPGroup, token_groups: int = 1):
        if token_groups < 1:
            raise ValueError(f"ep_token_groups must be >= 1, got {token_groups}")
        self.state, self.router, self.ep, self.token_groups = state, router, ep, token_groups

    # ------------------------------------------------------------------ routing decisions
    def _plan(self, moe, routing, n: int):
        k, e = moe.top_k, moe.num_experts
        rows = getattr(self.state, "rows", None) or 1
        if n % rows:
            raise ValueError(f"MoE got {n} tokens, not a multiple of the batch rows {rows}")
        dev = routing.experts.device
        expert = routing.experts.t().reshape(-1)  # choice-major: a = choice * n + token
        token = torch.arange(n, device=dev).repeat(k)
        choice = torch.arange(k, device=dev).repeat_interleave(n)
        bucket = (choice * rows + token // (n // rows)) * e + expert
        local = torch.bincount(bucket, minlength=k * rows * e)
        r = self.router
        gathered = all_gather_nograd(local, r.group) if r.size > 1 else local[None]
        counts = gathered.view(r.size, k * rows, e).sum((0, 1))  # [E] global assignments
        n_global = n * r.size
        keep, capacity = None, None
        if moe.capacity_factor is not None and moe.training:
            capacity = expert_capacity(n_global, k, e, moe.capacity_factor)
            g = gathered.view(r.size // r.cp, r.cp, k, rows, e).permute(2, 0, 3, 1, 4)
            flat = g.reshape(-1, e)
            before = (flat.cumsum(0) - flat).view(g.shape)  # assignments ahead in priority
            d, c = divmod(r.rank, r.cp)
            offset = before[:, d, :, c, :].reshape(-1)
            order = torch.argsort(bucket, stable=True)
            first = torch.cumsum(local, 0) - local
            pos = torch.empty_like(bucket)
            pos[order] = torch.arange(bucket.numel(), device=dev) - first[bucket[order]]
            keep = offset[bucket] + pos < capacity
        return expert, token, keep, counts, n_global, capacity

    # ------------------------------------------------------------------ forward
    def __call__(self, moe, flat: torch.Tensor, routing):
        n, k, e = flat.shape[0], moe.top_k, moe.num_experts
        expert, token, keep, counts, n_global, capacity = self._plan(moe, routing, n)
        weight = routing.weights.t().reshape(-1)
        idx = torch.arange(n * k, device=flat.device)
        if keep is not None:
            idx = idx[keep]
        ng = max(1, min(self.token_groups, n)) if self.ep.size > 1 else 1
        key = (token[idx] * ng // max(n, 1)) * e + expert[idx]  # (token group, expert)
        idx = idx[torch.argsort(key, stable=True)]
        kept = torch.bincount(key, minlength=ng * e).view(ng, e)
        parts = list(torch.split(idx, kept.sum(1).tolist()))
        if self.ep.size == 1:
            ys = moe.experts(lambda w1, w2: [_swiglu(flat[token[p]], kept[g], w1, w2)
                                             for g, p in enumerate(parts)])
        else:
            ys = moe.experts(lambda w1, w2: self._exchange(flat, token, parts, kept, w1, w2))
        # each (token, choice) has its own slot: scatter without atomics, then sum over k
        slot = token * k + torch.arange(k, device=flat.device).repeat_interleave(n)
        out = torch.cat(ys) * torch.cat([weight[p] for p in parts])[:, None].to(ys[0].dtype)
        out = flat.new_zeros(n * k, flat.shape[1], dtype=out.dtype).index_copy(
            0, slot[torch.cat(parts)], out).view(n, k, -1).sum(1)
        aux = self._aux_loss(routing.probs, counts, n_global)
        dropped = 0 if capacity is None else int((counts - capacity).clamp(min=0).sum())
        stats = MoEStats(load=(counts.float() / max(n_global * k, 1)).detach(), dropped=dropped,
                         assignments=n_global * k)
        return out.to(flat.dtype), aux, stats

    def _aux_loss(self, probs, counts, n_global):
        """E * sum_e f_e P_e over the router group, as this rank's share times the group size
        (the mean over ranks of the returned values is the loss)."""
        e = probs.shape[-1]
        f = counts.float() / max(n_global, 1)
        return e * (f * probs.sum(0)).sum() / max(n_global, 1) * self.router.size

    # ------------------------------------------------------------------ all-to-all
    def _exchange(self, flat, token, parts, kept_counts, w1, w2):
        ep = self.ep
        e = kept_counts.shape[1]
        per = e // ep.size
        mine = slice(ep.rank * per, (ep.rank + 1) * per)
        everyone = all_gather_nograd(kept_counts, ep.group).cpu()  # [ep, groups, E]
        sends, routes = [], []
        for g, p in enumerate(parts):
            in_splits = everyone[ep.rank, g].view(ep.size, per).sum(1).tolist()
            recv = everyone[:, g, mine]  # [ep(src), per]
            out_splits = recv.sum(1).tolist()
            sends.append(all_to_all(flat[token[p]], out_splits, in_splits, ep.group))
            routes.append((in_splits, out_splits, recv))
        backs = []
        for x, (in_splits, out_splits, recv) in zip(sends, routes):
            # rows arrive grouped by (source rank, expert); the grouped matmul wants expert-major
            seg = torch.repeat_interleave(torch.arange(recv.numel()), recv.reshape(-1))
            perm = torch.argsort((seg % per) * ep.size + seg // per, stable=True).to(flat.device)
            y = _swiglu(x[perm], recv.sum(0).to(flat.device), w1, w2)
            y = torch.empty_like(y).index_copy(0, perm, y)
            backs.append(all_to_all(y, in_splits, out_splits, ep.group))
        return backs
