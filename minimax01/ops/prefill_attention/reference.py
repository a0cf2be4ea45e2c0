"""A plain-PyTorch stand-in for torch.nn.attention.varlen.varlen_attn (causal, bottom-right
aligned, GQA by repeating K/V heads): the CPU twin that lets the gather and the wiring of the
flash prefill path be tested without CUDA. The reference for the whole path stays the slot /
paged attention twin (torch_slot_attention)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_mask(q_len: int, k_len: int, device=None, bottom_right: bool = True) -> torch.Tensor:
    """[q_len, k_len] bool, True = visible. Bottom-right: query i sees keys 0..k_len-q_len+i
    (a chunk after k_len - q_len cached tokens); top-left: keys 0..i (what it must NOT be)."""
    shift = k_len - q_len if bottom_right else 0
    qi = torch.arange(q_len, device=device)[:, None]
    return torch.arange(k_len, device=device)[None, :] <= qi + shift


def torch_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, 0),
                      enable_gqa=False, bottom_right=True):
    """q [Tq, H, D], k, v [Tk, Hkv, D] packed by document (cu_q, cu_k [N+1]); causal within each
    document (varlen_attn's `window_size=(-1, 0)`, the only window taken here). Like varlen_attn
    it refuses Hkv != H without `enable_gqa`. max_q / max_k: the signature's, unused."""
    if tuple(window_size) != (-1, 0):
        raise ValueError(f"torch_varlen_attn is causal only, got window_size={window_size}")
    h, hkv = q.shape[1], k.shape[1]
    if hkv != h and not enable_gqa:
        raise ValueError(f"Hq={h} and Hkv={hkv} need enable_gqa=True")
    out = torch.empty_like(q)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for a, b, c, e in zip(cq[:-1], cq[1:], ck[:-1], ck[1:]):
        if b == a:
            continue
        qd = q[a:b].transpose(0, 1)[None]
        kd, vd = k[c:e].transpose(0, 1)[None], v[c:e].transpose(0, 1)[None]
        if hkv != h:
            kd = kd.repeat_interleave(h // hkv, dim=1)
            vd = vd.repeat_interleave(h // hkv, dim=1)
        mask = causal_mask(b - a, e - c, q.device, bottom_right)
        o = F.scaled_dot_product_attention(qd, kd.to(q.dtype), vd.to(q.dtype), attn_mask=mask,
                                           scale=scale)
        out[a:b] = o[0].transpose(0, 1)
    return out
