"""Lightning attention: linear attention with a fixed per-head decay (SPEC §3).

`lightning_attn` is the one entry point; `backend` picks the implementation. Every backend
computes the same function: "naive" (quadratic masked form), "recurrent" (token loop),
"chunk" (blocked PyTorch, autograd) and "triton" (fused kernels; CUDA, or the CPU under
TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import torch

from .chunk import chunk_lightning_attn
from .decode import torch_lightning_decode
from .naive import naive_lightning_attn
from .recurrent import recurrent_lightning_attn
from .slopes import alibi_slopes, lightning_slopes

BACKENDS = ("naive", "recurrent", "chunk", "triton")

__all__ = ["lightning_attn", "lightning_decode", "alibi_slopes", "lightning_slopes", "BACKENDS",
           "triton_available"]


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


def _check_inputs(q, k, v, slope, initial_state, cu_seqlens, block_size):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q and k must share a shape and v its first three dims; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    b, t, h, d = q.shape
    if slope.shape != (h,):
        raise ValueError(f"slope must have shape [H]=[{h}], got {tuple(slope.shape)}")
    n = b
    if cu_seqlens is not None:
        if b != 1:
            raise ValueError(f"with cu_seqlens the batch must be 1 (packed), got B={b}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype.is_floating_point:
            raise ValueError("cu_seqlens must be a 1-D integer tensor [0, n1, n1+n2, ..., T]")
        offsets = cu_seqlens.tolist()
        if offsets[0] != 0 or offsets[-1] != t or any(x > y for x, y in zip(offsets, offsets[1:])):
            raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at T={t}; "
                             f"got {offsets[:4]}...{offsets[-2:]}")
        n = len(offsets) - 1
    if initial_state is not None:
        expect = (n, h, d, v.shape[-1])
        if tuple(initial_state.shape) != expect:
            raise ValueError(f"initial_state must have shape {list(expect)}, got "
                             f"{list(initial_state.shape)}")
    if block_size is not None and (not isinstance(block_size, int) or block_size <= 0):
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")


def lightning_attn(q, k, v, slope, *, initial_state=None, output_final_state=False, cu_seqlens=None,
                   block_size=None, backend=None):
    """Causal linear attention with decay exp(-slope[h]), no scale, no normalisation.

    q, k: [B, T, H, D]; v: [B, T, H, E]; slope: [H] fp32. With `cu_seqlens` (B == 1) the state
    restarts at every document (or at that document's row of `initial_state`).
    Returns (o [B, T, H, E] in q.dtype, final state [N, H, D, E] fp32 or None)."""
    _check_inputs(q, k, v, slope, initial_state, cu_seqlens, block_size)
    backend = backend or _default_backend(q)
    if backend == "naive":
        o, state = naive_lightning_attn(q, k, v, slope, initial_state, cu_seqlens)
    elif backend == "recurrent":
        o, state = recurrent_lightning_attn(q, k, v, slope, initial_state, cu_seqlens)
    elif backend == "chunk":
        o, state = chunk_lightning_attn(q, k, v, slope, initial_state, cu_seqlens, block_size)
    elif backend == "triton":
        from .triton_ops import triton_lightning_attn

        o, state = triton_lightning_attn(q, k, v, slope, initial_state, cu_seqlens, block_size,
                                         output_final_state)
    else:
        raise ValueError(f"unknown lightning backend {backend!r}; choose from {BACKENDS}")
    if not output_final_state:
        return o, None
    if state.dtype != torch.float64:
        state = state.float()
    return o, state


def lightning_decode(q, k, v, state, slope, *, slot_idx=None, backend=None):
    """One token for each of B sequences. q, k: [B, H, D]; v: [B, H, E]; state: [N, H, D, E] fp32,
    updated in place (rows `slot_idx` [B] when given, else N == B). Returns o [B, H, E]."""
    if q.dim() != 3 or k.shape != q.shape or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"decode expects q, k [B, H, D] and v [B, H, E]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, h, d = q.shape
    if state.dim() != 4 or state.shape[1:] != (h, d, v.shape[-1]):
        raise ValueError(f"state must be [N, {h}, {d}, {v.shape[-1]}], got {list(state.shape)}")
    if state.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"state must be fp32 (or fp64 for tests), got {state.dtype}")
    if slot_idx is None and state.shape[0] != b:
        raise ValueError(f"without slot_idx the state needs B={b} rows, got {state.shape[0]}")
    if slot_idx is not None and slot_idx.shape != (b,):
        raise ValueError(f"slot_idx must have shape [{b}], got {list(slot_idx.shape)}")
    backend = backend or _default_backend(q)
    if backend == "triton":
        from .triton_ops import triton_lightning_decode

        return triton_lightning_decode(q, k, v, state, slope, slot_idx)
    return torch_lightning_decode(q, k, v, state, slope, slot_idx)
