"""Lightning attention: linear attention with a fixed per-head decay (SPEC §3).

`lightning_attn` is the one entry point; `backend` picks the implementation. Every backend
computes the same function: "naive" (quadratic masked form), "recurrent" (token loop),
"chunk" (blocked PyTorch, autograd) and "triton" (fused kernels; CUDA, or the CPU under
TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import torch

from .checks import (check_cu_seqlens, check_decode_slots, check_max_seqlen, check_slope,
                     check_slot_idx, debug_checks, require_float, require_tensor)
from .chunk import chunk_lightning_attn
from .decode import torch_lightning_decode
from .naive import naive_lightning_attn
from .recurrent import recurrent_lightning_attn
from .slopes import alibi_slopes, lightning_slopes

BACKENDS = ("naive", "recurrent", "chunk", "triton")

__all__ = ["lightning_attn", "lightning_decode", "alibi_slopes", "lightning_slopes", "BACKENDS",
           "triton_available", "check_slot_idx", "debug_checks"]


def triton_available(device: torch.device | None = None) -> bool:
    """True when the Triton backend can run for tensors on `device`."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device is not None and device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def _default_backend(q: torch.Tensor) -> str:
    if q.is_cuda and triton_available(q.device):
        return "triton"
    return "chunk"


def _check_inputs(q, k, v, slope, initial_state, cu_seqlens, block_size, max_seqlen, backend):
    """Shapes, dtypes and host-side values; no device sync on the Triton path (checks.py)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        require_tensor(x, name, "[B, T, H, D]")
        require_float(x, name)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q and k must share a shape and v its first three dims; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    b, t, h, d = q.shape
    check_slope(slope, h)
    n = b
    if cu_seqlens is not None:
        n = check_cu_seqlens(cu_seqlens, t, b, host=backend != "triton")
    check_max_seqlen(max_seqlen, cu_seqlens, t)
    if initial_state is not None:
        require_tensor(initial_state, "initial_state", "[N, H, D, E] fp32")
        require_float(initial_state, "initial_state")
        expect = (n, h, d, v.shape[-1])
        if tuple(initial_state.shape) != expect:
            raise ValueError(f"initial_state must have shape {list(expect)}, got "
                             f"{list(initial_state.shape)}")
    if block_size is not None and (not isinstance(block_size, int) or block_size <= 0):
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")


@torch.compiler.disable
def lightning_attn(q, k, v, slope, *, initial_state=None, output_final_state=False, cu_seqlens=None,
                   block_size=None, backend=None, max_seqlen=None):
    """Causal linear attention with decay exp(-slope[h]), no scale, no normalisation.

    q, k: [B, T, H, D]; v: [B, T, H, E]; slope: [H] fp32, finite, >= 0. With `cu_seqlens`
    (B == 1) the state restarts at every document (or at that document's row of
    `initial_state`). `max_seqlen` (optional host int, the longest document) lets the Triton
    backend plan the work split of device-resident `cu_seqlens` exactly; a CPU `cu_seqlens`
    gives it everything. Neither is needed: without them nothing is read back from the GPU.
    Returns (o [B, T, H, E] in q.dtype, final state [N, H, D, E] fp32 or None).

    Opaque to torch.compile (`train.compile`): its host-side checks and the Triton launch plan
    are Python that Dynamo would split into many graphs; a compiled decoder layer breaks once
    around it and the kernels run as they do eagerly."""
    if backend is None:
        backend = _default_backend(q) if isinstance(q, torch.Tensor) else "chunk"
    _check_inputs(q, k, v, slope, initial_state, cu_seqlens, block_size, max_seqlen, backend)
    if backend == "naive":
        o, state = naive_lightning_attn(q, k, v, slope, initial_state, cu_seqlens)
    elif backend == "recurrent":
        o, state = recurrent_lightning_attn(q, k, v, slope, initial_state, cu_seqlens)
    elif backend == "chunk":
        o, state = chunk_lightning_attn(q, k, v, slope, initial_state, cu_seqlens, block_size)
    elif backend == "triton":
        from .triton_ops import triton_lightning_attn

        o, state = triton_lightning_attn(q, k, v, slope, initial_state, cu_seqlens, block_size,
                                         output_final_state, max_seqlen)
    else:
        raise ValueError(f"unknown lightning backend {backend!r}; choose from {BACKENDS}")
    if not output_final_state:
        return o, None
    if state.dtype != torch.float64:
        state = state.float()
    return o, state


def lightning_decode(q, k, v, state, slope, *, slot_idx=None, backend=None):
    """One token for each of B sequences. q, k: [B, H, D]; v: [B, H, E]; state: [N, H, D, E] fp32,
    updated in place (rows `slot_idx` [B] when given, else N == B). Returns o [B, H, E].

    `slot_idx` rows must be distinct and in [0, N): checked here when it is a CPU tensor; a GPU
    tensor is not read back (build it from host data checked with `check_slot_idx`): a bad row
    there updates nothing and gives NaN outputs (debug checks: a device assert)."""
    for name, x in (("q", q), ("k", k), ("v", v), ("state", state)):
        require_tensor(x, name, "a tensor")
        require_float(x, name)
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"decode expects q, k [B, H, D] and v [B, H, E]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, h, d = q.shape
    if state.dim() != 4 or state.shape[1:] != (h, d, v.shape[-1]):
        raise ValueError(f"state must be [N, {h}, {d}, {v.shape[-1]}], got {list(state.shape)}")
    if state.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"state must be fp32 (or fp64 for tests), got {state.dtype}")
    check_slope(slope, h)
    if slot_idx is None and state.shape[0] != b:
        raise ValueError(f"without slot_idx the state needs B={b} rows, got {state.shape[0]}")
    if slot_idx is not None:
        check_decode_slots(slot_idx, b, state.shape[0])
    backend = backend or _default_backend(q)
    if backend == "triton":
        from .triton_ops import triton_lightning_decode

        return triton_lightning_decode(q, k, v, state, slope, slot_idx)
    if slot_idx is not None and slot_idx.device.type != "cpu":
        # indexing would wrap a negative row onto the pool's last rows: a device assert instead
        # (graph-capturable, no sync; the torch path is the reference, not the hot path)
        torch._assert_async(((slot_idx >= 0) & (slot_idx < state.shape[0])).all(),
                            "slot_idx out of range")
    return torch_lightning_decode(q, k, v, state, slope, slot_idx)
