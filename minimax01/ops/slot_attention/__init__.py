"""Softmax attention of packed queries against a slot pool's KV cache (SPEC §4, §7).

The serving engine keeps post-RoPE keys and values per slot, `[S, Hkv, L, D]`. A step hands in
packed queries `[T, H, D]` grouped in documents; document `n` belongs to slot `slot[n]`, has
`qlen[n]` queries whose first sits at absolute position `ctx[n]` (tokens cached before this
step), and its keys are already written to the cache. Query at position `p` sees keys `0..p` of
its own slot: one rule for a prefill chunk (many queries, any prefix) and a decode step (one
query).

Two implementations compute the same thing (the `ops/lightning/` pattern):

  * `torch_slot_attention` (reference.py): any device, a loop over documents; the CPU path and
    the reference the kernel is tested against;
  * `triton_slot_attention` (triton_kernel.py): one launch for the whole batch, split over the
    keys for long contexts so one decode query still fills the GPU; no host synchronisation when
    the program list is given, so a decode step can be captured in a CUDA graph. Compiled on
    CUDA, interpreted on the CPU (ops/triton_jit.py).

Importing this package never imports triton (the server must start without it)."""

from __future__ import annotations

import importlib.util

import torch

from .reference import torch_slot_attention
from .work import decode_splits, work_list

__all__ = ["slot_attention", "torch_slot_attention", "triton_slot_attention", "triton_supported",
           "decode_splits", "work_list", "BACKENDS"]

BACKENDS = ("torch", "triton")

_TRITON = importlib.util.find_spec("triton") is not None


def triton_supported(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """True when the Triton kernel takes these shapes (and Triton is installed)."""
    d = q.shape[-1]
    return (_TRITON and d >= 16 and d & (d - 1) == 0 and q.dtype == keys.dtype
            and keys.stride(-1) == 1 and q.stride(-1) == 1)


def triton_slot_attention(q, keys, values, slot, ctx, qlen, scale, *, work=None, block_m=None,
                          num_splits=1, block_n=None):
    """q: [T, H, D]; keys, values: [S, Hkv, L, D]; slot, ctx, qlen: [N] int32 device tensors.
    `work` = (work_doc, work_q) [P] int32, the program list (see `work_list`); built here from
    host lengths when None (a host sync). `block_m` queries per program (1 for decode)."""
    from .triton_kernel import launch

    return launch(q, keys, values, slot, ctx, qlen, scale, work=work, block_m=block_m,
                  num_splits=num_splits, block_n=block_n)


def slot_attention(q, keys, values, slot, ctx, qlen, scale, *, backend=None, **kernel_args):
    """The one entry point: `backend` "triton" or "torch" (None: Triton on CUDA when it takes
    the shapes, else torch). `kernel_args` (work, block_m, num_splits, block_n) go to the
    kernel; the torch form reads the lengths on the host."""
    if backend is None:
        backend = "triton" if q.is_cuda and triton_supported(q, keys) else "torch"
    if backend == "triton":
        return triton_slot_attention(q, keys, values, slot, ctx, qlen, scale, **kernel_args)
    if backend == "torch":
        return torch_slot_attention(q, keys, values, slot, ctx, qlen, scale)
    raise ValueError(f"unknown slot attention backend {backend!r}; choose from {BACKENDS}")
