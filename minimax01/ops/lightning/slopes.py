"""Per-head decay rates of lightning attention (SPEC §3, "Decay")."""

from __future__ import annotations

import math

import torch


def alibi_slopes(num_heads: int) -> list[float]:
    """The ALiBi slope ladder: r^(h+1) with r = 2^(-8/H) for H a power of two; otherwise the
    ladder of the largest power of two p below H, then every other entry of the 2p ladder."""
    if num_heads <= 0:
        raise ValueError(f"num_heads must be positive, got {num_heads}")

    def ladder(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return ladder(num_heads)
    p = 2 ** math.floor(math.log2(num_heads))
    return ladder(p) + ladder(2 * p)[0::2][: num_heads - p]


def lightning_slopes(num_heads: int, layer_idx: int, num_layers: int) -> torch.Tensor:
    """fp32 [H] slopes s with decay exp(-s) for global layer `layer_idx` of `num_layers`:
    slope_h * (1 - l/(L-1) + 1e-5), and factor 1 + 1e-5 when L == 1."""
    if not 0 <= layer_idx < num_layers:
        raise ValueError(f"layer_idx {layer_idx} out of range for {num_layers} layers")
    factor = 1.0 + 1e-5 if num_layers == 1 else 1.0 - layer_idx / (num_layers - 1) + 1e-5
    base = torch.tensor(alibi_slopes(num_heads), dtype=torch.float64)
    return (base * factor).to(torch.float32)
