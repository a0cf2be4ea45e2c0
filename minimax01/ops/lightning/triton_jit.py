"""Triton kernels that compile on CUDA and run in Triton's interpreter on the CPU.

`triton.jit` decides when a function is decorated (from TRITON_INTERPRET) whether the kernel is
compiled or interpreted, so the outcome would hang on import order and on whoever set the
variable first. Kernels here are plain functions wrapped by `kernel`; the device of the tensors
of each launch picks the compiled or the interpreted form (interpreted for CPU tensors, or for any
tensors while TRITON_INTERPRET=1)."""

from __future__ import annotations

import contextlib
import os

import torch


def interpreted(device: torch.device) -> bool:
    """True when kernels for tensors on `device` run in Triton's interpreter."""
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


class DualKernel:
    """A Triton kernel function with a compiled twin (CUDA) and an interpreted twin (CPU)."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._compiled = None
        self._interpreted = None

    def at(self, device: torch.device):
        """The launchable kernel for tensors on `device`: use as `k.at(dev)[grid](*args)`."""
        if interpreted(device):
            if self._interpreted is None:
                self._interpreted = _Interpreted(self.fn)
            return self._interpreted
        if self._compiled is None:
            from triton.runtime.jit import JITFunction

            self._compiled = JITFunction(self.fn)
        return self._compiled


class _Interpreted:
    """An interpreted kernel whose calls into Triton's own jit helpers (tl.sum, tl.cdiv, ...,
    compiled-mode JITFunctions when triton was imported without TRITON_INTERPRET) are
    interpreted too, for the duration of each launch."""

    _helpers: dict = {}

    def __init__(self, fn):
        from triton.runtime.interpreter import InterpretedFunction

        self.inner = InterpretedFunction(fn)

    def __getitem__(self, grid):
        launch = self.inner[grid]

        def run(*args, **kwargs):
            with _helpers_interpreted():
                return launch(*args, **kwargs)

        return run


@contextlib.contextmanager
def _helpers_interpreted():
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    original = JITFunction.__call__
    cache = _Interpreted._helpers

    def call(self, *args, **kwargs):
        if self.fn not in cache:
            cache[self.fn] = InterpretedFunction(self.fn)
        return cache[self.fn](*args, **kwargs)

    JITFunction.__call__ = call
    try:
        yield
    finally:
        JITFunction.__call__ = original


def kernel(fn) -> DualKernel:
    return DualKernel(fn)
