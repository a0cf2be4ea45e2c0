"""The plain-PyTorch fused lightning decode: the twin the Triton kernels are tested against and
the path on devices without Triton. Same arithmetic as the kernels: SiLU in the activations'
dtype (as the model's), state update and o = q S in fp32, RMSNorm and gate on the fp32 o."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..lightning.decode import torch_lightning_decode
from ..moe import route
from ..norm import rms_norm


def torch_lightning_decode_gated(qkv, gate, state, slope, norm_weight, eps, slot_idx=None,
                                 valid=None):
    """qkv: [B, H * 3D] (qkv_proj's output, per head q|k|v, before SiLU); gate: [B, H * D]
    (output_gate's output, before the sigmoid); state: [N, H, D, D] fp32, updated in place
    (rows `slot_idx`); valid: [B] bool or None (False rows add nothing to their state).
    Returns sigmoid(gate) * RMSNorm(o) [B, H * D] in qkv.dtype, what out_proj takes."""
    b, h = qkv.shape[0], slope.shape[0]
    d = qkv.shape[1] // (3 * h)
    q, k, v = F.silu(qkv).view(b, h, 3 * d).split(d, dim=-1)
    if valid is not None:
        v = v * valid.reshape(b, 1, 1).to(v.dtype)
    o = torch_lightning_decode(q.to(state.dtype), k, v, state, slope, slot_idx).reshape(b, h * d)
    y = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + eps)
    return (torch.sigmoid(gate.to(o.dtype)) * norm_weight.to(o.dtype) * y).to(qkv.dtype)


def torch_residual_rms_norm(x, weight, eps, residual=None, alpha=1.0, beta=1.0):
    """The decoder layer's DeepNorm residual then RMSNorm, exactly as the model writes them:
    y = alpha * residual + beta * x (y = x without a residual), h = RMSNorm(y) * weight.
    x, residual: [B, hidden]. Returns (y, h)."""
    y = x if residual is None else alpha * residual + beta * x
    return y, rms_norm(y, weight, eps)


def torch_moe_decode(x, router_logits, gate_up, down, top_k):
    """A few tokens through the MoE (SPEC §5) without a dispatch plan: each token's top-k
    experts' SwiGLU, router-weighted, rounded where the serving pipeline rounds (ops/moe.py).
    x: [N, H]; router_logits: [N, E]; gate_up: [E, 2I, H]; down: [E, H, I]. Returns [N, H]."""
    routing = route(router_logits, top_k)
    w1 = gate_up[routing.experts]                                   # [N, k, 2I, H]
    h = torch.einsum("nkoh,nh->nko", w1.float(), x.float()).to(x.dtype)
    g, u = h.chunk(2, dim=-1)
    a = F.silu(g) * u
    y = torch.einsum("nkhi,nki->nkh", down[routing.experts].float(), a.float()).to(x.dtype)
    return (y * routing.weights.to(x.dtype)[..., None]).sum(1)
