"""Partial rotary position embedding (SPEC §4): only the first `rotary_dim` dims of each head
rotate, with the rotate-half (NeoX) pairing i <-> i + rotary_dim/2; computed in fp32."""

from __future__ import annotations

import torch


def rope_cos_sin(position_ids: torch.Tensor, rotary_dim: int, theta: float):
    """cos, sin of shape [*position_ids.shape, rotary_dim] in fp32."""
    exponent = torch.arange(0, rotary_dim, 2, device=position_ids.device, dtype=torch.int64).float()
    inv_freq = 1.0 / (theta ** (exponent / rotary_dim))
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos, sin: [B, T, R] or [T, R] with R = rotary_dim <= D."""
    r = cos.shape[-1]
    if r == 0:
        return x
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos.float()[:, :, None, :], sin.float()[:, :, None, :]
    rot = x[..., :r].float()
    half = r // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    out = (rot * cos + rotated * sin).to(x.dtype)
    if r == x.shape[-1]:
        return out
    return torch.cat([out, x[..., r:]], dim=-1)
