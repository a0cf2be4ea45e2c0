"""Mixture-of-experts pieces (SPEC §5): routing, the load-balancing loss, capacity (token drop),
permutation of tokens into expert order, and the grouped SwiGLU expert matmuls."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


def expert_counts(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens routed to each expert (int64 [E])."""
    return torch.bincount(experts.flatten(), minlength=num_experts)


def load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Switch/Mixtral form E * sum_e f_e P_e, f_e = tokens choosing e / tokens (sums to k),
    P_e = mean router probability. Uniform routing gives k. `counts`/`num_tokens` may be global
    (all-reduced) while `probs` is local: the gradient flows through P only."""
    num_experts = probs.shape[-1]
    f = counts.float() / max(num_tokens, 1)
    p = probs.mean(dim=0) if probs.shape[0] else probs.sum(dim=0)
    return num_experts * (f * p).sum()


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


@dataclass
class Dispatch:
    order: torch.Tensor    # [M] indices into the flattened [N*k] assignments, grouped by expert
    counts: torch.Tensor   # [E] kept assignments per expert
    dropped: int           # assignments over capacity (contribute 0)


def dispatch(experts: torch.Tensor, num_experts: int, capacity: int | None = None) -> Dispatch:
    """Group the N*k (token, choice) assignments by expert. With a capacity, each expert keeps its
    first `capacity` assignments, first choices before second choices, then in token order
    (GShard priority); the rest are dropped."""
    n, k = experts.shape
    flat = experts.t().reshape(-1)  # choice-major: every token's first choice comes first
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    dropped = 0
    if capacity is not None:
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(order.numel(), device=order.device) - starts.repeat_interleave(counts)
        keep = rank < capacity
        dropped = int((~keep).sum().item())
        order = order[keep]
        counts = counts.clamp(max=capacity)
    # back to token-major flat indices (token * k + choice)
    order = (order % n) * k + order // n
    return Dispatch(order, counts, dropped)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x: [M, K] rows grouped by expert (counts [E]); w: [E, N, K] (nn.Linear layout).
    Returns [M, N] with row block e multiplied by w[e]^T. Under CUDA autocast (fp32 weights,
    bf16 compute: training) both operands are cast to the autocast dtype."""
    dtype = x.dtype
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
    if x.is_cuda and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm"):
        offs = torch.cumsum(counts, 0).to(torch.int32)
        return torch._grouped_mm(x.to(dtype), w.to(dtype).transpose(-2, -1), offs=offs)
    outs = [xe @ w[e].t() for e, xe in enumerate(torch.split(x, counts.tolist())) if xe.shape[0]]
    return torch.cat(outs, 0) if outs else x.new_zeros(0, w.shape[1])


def swiglu_experts(x: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor,
                   down: torch.Tensor) -> torch.Tensor:
    """x: [M, H] grouped by expert; gate_up: [E, 2I, H] (w1 rows then w3 rows); down: [E, H, I]."""
    h = grouped_mm(x, gate_up, counts)
    g, u = h.chunk(2, dim=-1)
    return grouped_mm(F.silu(g) * u, down, counts)


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
