"""A memory-bounds checker for Triton's interpreter (CPU), for the lightning kernel tests.

On the GPU an out-of-bounds load or store is an illegal memory access (or, worse, silent
corruption); in the interpreter it reads or writes whatever host memory lies there. Inside
`bounds_checked()` every interpreted launch records the byte extent of each tensor argument
(TensorDescriptor bases included), and every masked load and store checks that the addresses
of its active lanes all fall inside ONE of those extents (a block access comes from one base
pointer, so lanes straddling two tensors are a bug too). A violation raises at once, naming the
kernel, the access and how far outside the nearest tensor it is.

Descriptor loads reach the same masked load with the descriptor's own bounds mask (TMA
semantics: rows past the tensor are zero-filled, not read), so they are checked as the GPU runs
them."""

from __future__ import annotations

import contextlib

import numpy as np
import torch


class OutOfBounds(AssertionError):
    pass


_STATE = {"spans": None, "kernel": None, "accesses": 0}


def _extent(t: torch.Tensor):
    """[lo, hi) bytes a tensor view may touch (positive strides)."""
    size = t.element_size()
    if t.numel() == 0:
        return (t.data_ptr(), t.data_ptr())
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 0)
    return (t.data_ptr(), t.data_ptr() + (last + 1) * size)


def _spans(args, kwargs):
    from triton.tools.tensor_descriptor import TensorDescriptor

    out = []
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, TensorDescriptor):
            a = a.base
        if isinstance(a, torch.Tensor):
            out.append(_extent(a))
    return out


def _check(ptrs, mask, what):
    spans = _STATE["spans"]
    if spans is None:
        return
    p = np.asarray(ptrs, dtype=np.uint64).reshape(-1)
    m = np.broadcast_to(np.asarray(mask, dtype=bool), np.shape(ptrs)).reshape(-1)
    p = p[m]
    if p.size == 0:
        return
    _STATE["accesses"] += 1
    lo, hi = int(p.min()), int(p.max())
    for a, b in spans:
        if a <= lo and hi < b:
            return
    gaps = [max(a - lo, hi + 1 - b, 0) for a, b in spans]
    raise OutOfBounds(f"{_STATE['kernel']}: {what} of {p.size} lanes at [{lo:#x}, {hi:#x}] is "
                      f"outside every tensor argument (nearest by {min(gaps, default=-1)} bytes)")


@contextlib.contextmanager
def bounds_checked():
    """Check every load and store of the interpreted launches inside the block. Yields a dict
    whose 'accesses' counts the checked accesses (a test can assert the checker ran)."""
    from triton.runtime import interpreter as interp

    builder = interp.InterpreterBuilder
    executor = interp.GridExecutor
    orig_load, orig_store = builder.create_masked_load, builder.create_masked_store
    orig_call = executor.__call__

    def load(self, ptrs, mask, other, cache_policy, is_volatile):
        _check(ptrs.data, mask.data, "load")
        return orig_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def store(self, ptrs, value, mask, cache_policy):
        _check(ptrs.data, mask.data, "store")
        return orig_store(self, ptrs, value, mask, cache_policy)

    def call(self, *args, **kwargs):
        saved = (_STATE["spans"], _STATE["kernel"])
        _STATE["spans"] = _spans(args, kwargs)
        _STATE["kernel"] = getattr(self.fn, "__name__", "kernel")
        try:
            return orig_call(self, *args, **kwargs)
        finally:
            _STATE["spans"], _STATE["kernel"] = saved

    builder.create_masked_load, builder.create_masked_store = load, store
    executor.__call__ = call
    _STATE["accesses"] = 0
    try:
        yield _STATE
    finally:
        builder.create_masked_load, builder.create_masked_store = orig_load, orig_store
        executor.__call__ = orig_call
