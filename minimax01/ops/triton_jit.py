"""The one launcher for every Triton kernel in ops/: compiled on CUDA, interpreted on the CPU.

`triton.jit` decides when a function is decorated (from TRITON_INTERPRET) whether the kernel is
compiled or interpreted, so the outcome would hang on import order and on whoever set the
variable first. Kernels are plain functions wrapped by `kernel`; the device of the tensors of
each launch picks the form: interpreted for CPU tensors (or for any tensors while
TRITON_INTERPRET=1), compiled for CUDA tensors. `k.at(device)[grid](*args)` launches.

Interpreted launches and Triton's own jit helpers. `tl.sum`, `tl.max`, `tl.cdiv`, ... are
`JITFunction`s in compiled mode (triton imported without TRITON_INTERPRET), and calling one
outside a compiled kernel raises. For the duration of an interpreted launch,
`JITFunction.__call__` runs the helper in the interpreter instead. The patch is class-wide (the
interpreter itself patches `triton.language` module-wide during a launch, for the same reason),
but it only changes what *calling* a JITFunction does, which compiled launches never do
(`kernel[grid](...)` goes through `__getitem__`/`run`), and a lock keeps interpreted launches from
different threads from restoring each other's patch early.

Importing this module does not import triton: a model without Triton never touches it."""

from __future__ import annotations

import contextlib
import os
import threading

import torch

__all__ = ["DualKernel", "interpreted", "kernel"]


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
    """An interpreted kernel whose calls into Triton's own jit helpers are interpreted too, for
    the duration of each launch."""

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


_LOCK = threading.RLock()


@contextlib.contextmanager
def _helpers_interpreted():
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    cache = _Interpreted._helpers

    def call(self, *args, **kwargs):
        if self.fn not in cache:
            cache[self.fn] = InterpretedFunction(self.fn)
        return cache[self.fn](*args, **kwargs)

    with _LOCK:
        original = JITFunction.__call__
        JITFunction.__call__ = call
        try:
            yield
        finally:
            JITFunction.__call__ = original


def kernel(fn) -> DualKernel:
    """Decorator: `@kernel def my_kernel(...)` (instead of `@triton.jit`)."""
    return DualKernel(fn)
