"""RMSNorm as the official code computes it: normalise in fp32 (fp64 stays fp64, for reference
tests), cast back, then scale. The normalisation is `F.rms_norm` without a weight: one fused
kernel forward and one backward on CUDA (torch >= 2.8) instead of pow / mean / add / rsqrt /
mul and their backward chain; on CPU the same arithmetic as x * rsqrt(mean(x^2) + eps).

The result has x's dtype, as the official code gives with weights in the activations' dtype:
fp32 master weights under bf16 autocast would otherwise promote a bf16 activation (the
lightning output norm's) to fp32, and every kernel after it (the output gate's product, the
cast autocast then makes for out_proj, and their backward) would move twice the bytes. With
x in fp32 or fp64 nothing changes."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x if x.dtype == torch.float64 else x.float()
    y = F.rms_norm(xf, (xf.shape[-1],), None, eps)
    out = weight * y.to(x.dtype)
    return out if out.dtype == x.dtype else out.to(x.dtype)
