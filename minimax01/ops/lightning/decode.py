"""One decode step for a batch (SPEC §3 "Decode step"): S <- lambda S + k^T v, o = q S."""

from __future__ import annotations

import torch


def torch_lightning_decode(q, k, v, state, slope, slot_idx=None):
    """q, k: [B, H, D]; v: [B, H, E]; state: [N, H, D, E] fp32, updated in place (rows `slot_idx`
    when given, else rows 0..B-1 with N == B). Returns o [B, H, E] in q.dtype."""
    lam = torch.exp(-slope.to(state.dtype))[None, :, None, None]
    rows = state if slot_idx is None else state[slot_idx]
    new = lam * rows + k.to(state.dtype)[..., :, None] * v.to(state.dtype)[..., None, :]
    if slot_idx is None:
        state.copy_(new)
    else:
        state[slot_idx] = new
    return torch.einsum("bhd,bhde->bhe", q.to(state.dtype), new).to(q.dtype)
