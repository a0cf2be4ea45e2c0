"""Re-export of the shared Triton launcher (`minimax01.ops.triton_jit`), kept so the lightning
kernels' `from .triton_jit import kernel` keeps working."""

from ..triton_jit import DualKernel, interpreted, kernel  # noqa: F401

__all__ = ["DualKernel", "interpreted", "kernel"]
