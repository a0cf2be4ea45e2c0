"""Quantised stand-ins for the model's matmul modules (weight-only 8-bit, W8A16):

    QuantizedExperts  for model.layers.Experts: same call `(x_grouped, counts, pipeline) -> y`, same tensor
                      names (gate_up_proj [E, 2I, H], down_proj [E, H, I], now int8 | fp8) plus
                      `gate_up_proj_scale` [E, 2I] and `down_proj_scale` [E, H] (fp32)
    QuantizedLinear   for a bias-free nn.Linear: `weight` [N, K] int8 | fp8 plus `weight_scale` [N]

The 8-bit tensors and scales are buffers, not parameters: `model.parameters()` keeps meaning "the
16-bit weights" (code that casts parameters to a dtype leaves the 8-bit ones alone), and
`state_dict()` carries everything a pre-quantised checkpoint stores."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.moe import TRAINING, MoEPipeline
from ..ops.quant import grouped_mm_q, linear_q, quantize, storage_dtype
from ..ops.quant.schemes import format_of


def _quantize_stacked(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per expert (bounded temporaries: one expert's fp32 copy at a time)."""
    q = torch.empty(w.shape, dtype=storage_dtype(fmt), device=w.device)
    s = torch.empty(w.shape[:-1], dtype=torch.float32, device=w.device)
    for e in range(w.shape[0]):
        q[e], s[e] = quantize(w[e].detach(), fmt)
    return q, s


class QuantizedExperts(nn.Module):
    """SwiGLU experts over 8-bit weights: h = x @ (q1 * s1)^T, y = (SiLU(g) * u) @ (q2 * s2)^T."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, fmt: str,
                 device=None):
        super().__init__()
        self.format = fmt
        dt = storage_dtype(fmt)
        e, h, i = num_experts, hidden, intermediate
        self.register_buffer("gate_up_proj", torch.zeros(e, 2 * i, h, dtype=dt, device=device))
        self.register_buffer("gate_up_proj_scale", torch.ones(e, 2 * i, device=device))
        self.register_buffer("down_proj", torch.zeros(e, h, i, dtype=dt, device=device))
        self.register_buffer("down_proj_scale", torch.ones(e, h, device=device))
        self.backend: str | None = None  # None: ops.quant picks per device

    @classmethod
    def from_experts(cls, experts: nn.Module, fmt: str) -> "QuantizedExperts":
        gu, dn = experts.gate_up_proj, experts.down_proj
        e, two_i, h = gu.shape
        out = cls(e, h, two_i // 2, fmt, device="meta")
        out.gate_up_proj, out.gate_up_proj_scale = _quantize_stacked(gu, fmt)
        out.down_proj, out.down_proj_scale = _quantize_stacked(dn, fmt)
        return out

    def forward(self, x: torch.Tensor, counts: torch.Tensor,
                pipeline: MoEPipeline = TRAINING) -> torch.Tensor:
        """The run stage of the MoE pipeline, like `model.layers.Experts`: x [M, H] rows grouped
        by (token group, expert), counts [G, E] (or [E]); the pipeline's exchange decides where
        rows go, this module only brings the quantised grouped SwiGLU."""
        counts = counts[None] if counts.dim() == 1 else counts
        return pipeline.exchange.run(self._swiglu, x, counts)

    def _swiglu(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        h = grouped_mm_q(x, self.gate_up_proj, self.gate_up_proj_scale, counts,
                         backend=self.backend)
        g, u = h.chunk(2, dim=-1)
        return grouped_mm_q(F.silu(g) * u, self.down_proj, self.down_proj_scale, counts,
                            backend=self.backend)

    def extra_repr(self) -> str:
        e, two_i, h = self.gate_up_proj.shape
        return f"experts={e}, hidden={h}, intermediate={two_i // 2}, format={self.format}"


class QuantizedLinear(nn.Module):
    """y = x @ (q * scale)^T, output in x's dtype (no bias: the model has none)."""

    def __init__(self, in_features: int, out_features: int, fmt: str, device=None):
        super().__init__()
        self.in_features, self.out_features, self.format = in_features, out_features, fmt
        self.register_buffer("weight", torch.zeros(out_features, in_features,
                                                   dtype=storage_dtype(fmt), device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, device=device))
        self.backend: str | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str) -> "QuantizedLinear":
        if linear.bias is not None:
            raise ValueError("QuantizedLinear: the model's linears have no bias")
        out = cls(linear.in_features, linear.out_features, fmt, device="meta")
        out.weight, out.weight_scale = quantize(linear.weight.detach(), fmt)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_q(x, self.weight, self.weight_scale, backend=self.backend)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"


def module_format(module: nn.Module) -> str | None:
    """"int8" / "fp8" for a quantised module, None otherwise."""
    if isinstance(module, QuantizedExperts):
        return format_of(module.gate_up_proj.dtype)
    if isinstance(module, QuantizedLinear):
        return format_of(module.weight.dtype)
    return None
