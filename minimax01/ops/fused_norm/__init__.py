"""Row-wise fused norms for the serving prefill (issue 18: a mixed step's fixed cost): the
decoder layer's RMSNorms and the lightning layer's RMSNorm + sigmoid gate, one launch each for
any number of rows, instead of ~8 kernels (cast, pow, mean, add, rsqrt, mul, cast, mul).

  residual_rms_norm(x, weight, eps, residual=None, alpha=1, beta=1) -> (y, h)
      y = alpha * residual + beta * x (x itself without a residual), h = RMSNorm(y) * weight
  gated_rms_norm(o, gate, weight, eps) -> sigmoid(gate) * RMSNorm(o) * weight

Both round where the model's own code rounds (model/layers.py, ops/norm.py): every product of
the residual in the activations' dtype, the normalised rows cast back before the weight, the
sigmoid and the gate product in the activations' dtype. The twins (reference.py) ARE the model's
formulas; the kernels differ from them only in the order of the fp32 sum of squares. (ops/decode's
kernels keep the lightning tail in fp32, which SPEC does not: these are for the prefill, where
the output must be the model's.) Backends: "triton" (triton_kernel.py; interpreted on the CPU)
and "torch". Importing this package never imports triton."""

from __future__ import annotations

import torch

from ..lightning import triton_available
from .reference import torch_gated_rms_norm, torch_residual_rms_norm

__all__ = ["residual_rms_norm", "gated_rms_norm", "torch_residual_rms_norm",
           "torch_gated_rms_norm", "BACKENDS"]

BACKENDS = ("torch", "triton")


def _backend(x: torch.Tensor, backend: str | None) -> str:
    if backend is None:
        backend = "triton" if x.is_cuda and triton_available(x.device) else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown fused norm backend {backend!r}; choose from {BACKENDS}")
    return backend


def residual_rms_norm(x, weight, eps, residual=None, alpha=1.0, beta=1.0, *, backend=None):
    """x, residual: [N, width]; weight [width]. Returns (y, h) (see the module docstring)."""
    if x.dim() != 2 or weight.shape != x.shape[1:] or (residual is not None
                                                       and residual.shape != x.shape):
        raise ValueError(f"residual_rms_norm takes x [N, W], weight [W] and residual like x; got "
                         f"{list(x.shape)}, {list(weight.shape)}"
                         f"{'' if residual is None else ', ' + str(list(residual.shape))}")
    same = weight.dtype == x.dtype and (residual is None or residual.dtype == x.dtype)
    if _backend(x, backend) == "triton" and same:  # (mixed dtypes: the twin rounds them)
        from .triton_kernel import launch_residual_norm

        return launch_residual_norm(x, weight, eps, residual, alpha, beta)
    return torch_residual_rms_norm(x, weight, eps, residual, alpha, beta)


def gated_rms_norm(o, gate, weight, eps, *, backend=None):
    """o, gate: [N, width] (the lightning output over all heads; output_gate's output before
    the sigmoid); weight [width]. Returns sigmoid(gate) * RMSNorm(o) * weight [N, width]."""
    if o.dim() != 2 or gate.shape != o.shape or weight.shape != o.shape[1:]:
        raise ValueError(f"gated_rms_norm takes o [N, W], gate like o and weight [W]; got "
                         f"{list(o.shape)}, {list(gate.shape)}, {list(weight.shape)}")
    if _backend(o, backend) == "triton" and o.dtype == gate.dtype == weight.dtype:
        from .triton_kernel import launch_gated_norm

        return launch_gated_norm(o, gate, weight, eps)
    return torch_gated_rms_norm(o, gate, weight, eps)
