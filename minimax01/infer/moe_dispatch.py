"""An inference MoE dispatcher with no host synchronisation, so decode steps can be captured in
CUDA graphs. Plugs into `MoE.dispatcher`; same function as `MoE.local_forward` without capacity
(inference is dropless), no aux loss and no routing statistics."""

from __future__ import annotations

import torch

from ..ops.moe import combine


def _grouped_ok(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")


def sync_free_dispatch(moe, flat: torch.Tensor, routing):
    n, k = routing.experts.shape
    e = moe.num_experts
    gate_up, down = moe.experts.gate_up_proj, moe.experts.down_proj
    if _grouped_ok(flat):
        assignments = routing.experts.reshape(-1)                  # token-major: token * k + c
        order = torch.argsort(assignments, stable=True)
        counts = torch.zeros(e, dtype=torch.int32, device=flat.device)
        counts.scatter_add_(0, assignments, torch.ones_like(assignments, dtype=torch.int32))
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        x = flat[order // k]
        h = torch._grouped_mm(x, gate_up.transpose(-2, -1), offs=offs)
        g, u = h.chunk(2, dim=-1)
        y = torch._grouped_mm(torch.nn.functional.silu(g) * u, down.transpose(-2, -1), offs=offs)
        out = combine(y, order, routing.weights, n)
    else:  # dense over experts: every expert sees every token, weighted by its routing weight
        dense_w = torch.zeros(n, e, device=flat.device, dtype=torch.float32)
        dense_w.scatter_(1, routing.experts, routing.weights)
        h = torch.einsum("nh,eih->eni", flat, gate_up)
        g, u = h.chunk(2, dim=-1)
        y = torch.einsum("eni,ehi->enh", torch.nn.functional.silu(g) * u, down)
        out = torch.einsum("enh,ne->nh", y.float(), dense_w)
    return out.to(flat.dtype), flat.new_zeros((), dtype=torch.float32), None


def install(model) -> None:
    """Route every MoE layer of `model` through `sync_free_dispatch` (or the dispatcher its
    experts name, e.g. quantised experts)."""
    for layer in model.model.layers:
        layer.mlp.dispatcher = getattr(layer.mlp.experts, "inference_dispatcher", sync_free_dispatch)
