"""Shared helpers of the lightning-attention implementations."""

from __future__ import annotations

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float64 stays float64 (reference tests), everything else runs in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def split_documents(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end), ...] from FlashAttention-style offsets."""
    offsets = cu_seqlens.tolist()
    return list(zip(offsets[:-1], offsets[1:]))
