"""The twins of the fused norms: the model's own formulas (model/layers.py, ops/norm.py)."""

from __future__ import annotations

import torch

from ..norm import rms_norm


def torch_residual_rms_norm(x, weight, eps, residual=None, alpha=1.0, beta=1.0):
    """y = alpha * residual + beta * x (x without a residual), h = rms_norm(y, weight, eps)."""
    y = x if residual is None else alpha * residual + beta * x
    return y, rms_norm(y, weight, eps)


def torch_gated_rms_norm(o, gate, weight, eps):
    """LightningAttention's tail before out_proj: sigmoid(gate) * rms_norm(o, weight, eps)."""
    return torch.sigmoid(gate) * rms_norm(o, weight, eps)
