"""Fused kernels for small-batch decode (issue 18 item 4): at batch 1 a decode step is launch
bound (~60 kernels per layer against a 0.26 ms bandwidth floor for `1b`), so the lightning
layer's elementwise tail is fused.

`lightning_decode_gated(qkv, gate, state, slope, norm_weight, eps, ...)` is one token of a
lightning layer between its input projections and out_proj (SPEC §3): SiLU, split per head,
S <- lam S + k^T v, o = q S, RMSNorm over all heads, sigmoid output gate. Backends: "triton"
(two launches, triton_kernel.py; interpreted on the CPU) and "torch" (reference.py). The module
glue that calls it from a model (and decides when it may) is infer/fused_decode.py.

`residual_rms_norm(x, weight, eps, residual=None, alpha=1, beta=1) -> (y, h)` is the decoder
layer's DeepNorm residual and the RMSNorm after it (y = alpha * residual + beta * x, h =
RMSNorm(y) * weight) in one launch instead of ~10. `moe_decode(x, router_logits, gate_up, down,
top_k)` is the MoE of up to MOE_MAX_TOKENS tokens in two launches after the router matmul
(triton_moe.py) instead of ~25.

Importing this package never imports triton."""

from __future__ import annotations

import torch

from ..lightning import triton_available
from ..lightning.checks import check_decode_slots, check_slope
from .reference import torch_lightning_decode_gated, torch_moe_decode, torch_residual_rms_norm

__all__ = ["lightning_decode_gated", "torch_lightning_decode_gated",
           "triton_lightning_decode_gated", "residual_rms_norm", "torch_residual_rms_norm",
           "triton_residual_rms_norm", "moe_decode", "torch_moe_decode", "triton_moe_decode",
           "MOE_MAX_TOKENS", "BACKENDS"]

MOE_MAX_TOKENS = 4  # beyond, the grouped matmul (each expert read once) wins: triton_moe.py

BACKENDS = ("torch", "triton")


def triton_lightning_decode_gated(qkv, gate, state, slope, norm_weight, eps, slot_idx=None,
                                  valid=None):
    from .triton_kernel import launch

    return launch(qkv, gate, state, slope, norm_weight, eps, slot_idx, valid)


def lightning_decode_gated(qkv, gate, state, slope, norm_weight, eps, *, slot_idx=None,
                           valid=None, backend=None):
    """qkv [B, H*3D], gate [B, H*D], state [N, H, D, D] fp32 (in place, rows `slot_idx`),
    slope [H], norm_weight [H*D], valid [B] bool or None. Returns [B, H*D] in qkv.dtype.
    backend None: Triton on CUDA (when installed), torch otherwise."""
    h = slope.shape[0] if torch.is_tensor(slope) else len(slope)
    if qkv.dim() != 2 or qkv.shape[1] % (3 * h):
        raise ValueError(f"qkv must be [B, {h} * 3 * head_dim], got {list(qkv.shape)}")
    b, d = qkv.shape[0], qkv.shape[1] // (3 * h)
    if gate.shape != (b, h * d) or norm_weight.shape != (h * d,):
        raise ValueError(f"gate must be [{b}, {h * d}] and norm_weight [{h * d}], got "
                         f"{list(gate.shape)} and {list(norm_weight.shape)}")
    if state.dim() != 4 or state.shape[1:] != (h, d, d) or state.dtype != torch.float32:
        raise ValueError(f"state must be fp32 [N, {h}, {d}, {d}], got {state.dtype} "
                         f"{list(state.shape)}")
    check_slope(slope, h)
    if slot_idx is None and state.shape[0] != b:
        raise ValueError(f"without slot_idx the state needs B={b} rows, got {state.shape[0]}")
    if slot_idx is not None:
        check_decode_slots(slot_idx, b, state.shape[0])
    if backend is None:
        backend = "triton" if qkv.is_cuda and triton_available(qkv.device) else "torch"
    if backend == "triton":
        return triton_lightning_decode_gated(qkv, gate, state, slope, norm_weight, eps,
                                             slot_idx, valid)
    if backend == "torch":
        return torch_lightning_decode_gated(qkv, gate, state, slope, norm_weight, eps,
                                            slot_idx, valid)
    raise ValueError(f"unknown fused decode backend {backend!r}; choose from {BACKENDS}")


def triton_residual_rms_norm(x, weight, eps, residual=None, alpha=1.0, beta=1.0):
    from .triton_kernel import launch_residual_norm

    return launch_residual_norm(x, weight, eps, residual, alpha, beta)


def residual_rms_norm(x, weight, eps, residual=None, alpha=1.0, beta=1.0, *, backend=None):
    """x, residual: [B, hidden]; weight [hidden]. Returns (y, h): y = alpha * residual +
    beta * x (x itself without a residual), h = RMSNorm(y) * weight. backend None: Triton on
    CUDA (when installed), torch otherwise."""
    if x.dim() != 2 or weight.shape != x.shape[1:] or (residual is not None
                                                       and residual.shape != x.shape):
        raise ValueError(f"residual_rms_norm takes x [B, H], weight [H] and residual like x; got "
                         f"{list(x.shape)}, {list(weight.shape)}"
                         f"{'' if residual is None else ', ' + str(list(residual.shape))}")
    if backend is None:
        backend = "triton" if x.is_cuda and triton_available(x.device) else "torch"
    if backend == "triton":
        return triton_residual_rms_norm(x, weight, eps, residual, alpha, beta)
    if backend == "torch":
        return torch_residual_rms_norm(x, weight, eps, residual, alpha, beta)
    raise ValueError(f"unknown fused decode backend {backend!r}; choose from {BACKENDS}")


def triton_moe_decode(x, router_logits, gate_up, down, top_k):
    from .triton_moe import launch_moe

    return launch_moe(x, router_logits, gate_up, down, top_k)


def moe_decode(x, router_logits, gate_up, down, top_k, *, backend=None):
    """x [N, H] (N <= MOE_MAX_TOKENS), router_logits [N, E], gate_up [E, 2I, H], down
    [E, H, I] (model/layers.py `Experts`). Returns the MoE output [N, H] in x.dtype."""
    n, hd = x.shape
    e = gate_up.shape[0]
    if (router_logits.shape != (n, e) or gate_up.dim() != 3 or gate_up.shape[2] != hd
            or down.shape != (e, hd, gate_up.shape[1] // 2) or not 0 < top_k <= e):
        raise ValueError(f"moe_decode: x {list(x.shape)}, router_logits {list(router_logits.shape)}"
                         f", gate_up {list(gate_up.shape)}, down {list(down.shape)}, top_k "
                         f"{top_k} do not fit together")
    if n > MOE_MAX_TOKENS:
        raise ValueError(f"moe_decode is for at most {MOE_MAX_TOKENS} tokens, got {n}")
    if backend is None:
        backend = "triton" if x.is_cuda and triton_available(x.device) else "torch"
    if backend == "triton":
        return triton_moe_decode(x, router_logits, gate_up, down, top_k)
    if backend == "torch":
        return torch_moe_decode(x, router_logits, gate_up, down, top_k)
    raise ValueError(f"unknown fused decode backend {backend!r}; choose from {BACKENDS}")
