"""Softmax attention dispatch (SPEC §4): causal GQA attention over [B, T, H, D] tensors, with
document boundaries (`cu_seqlens`) or a KV cache with a key padding mask; and sliding-window
attention (a query sees its own and the `window - 1` keys before it, in its own document), which
runs in query blocks so memory is O(T * (block + window)), never O(T^2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")  # torch >= 2.5


def _sdpa(q, k, v, *, is_causal=False, attn_mask=None, scale=None):
    """q: [B, H, T, D], k, v: [B, Hkv, S, D]."""
    if k.shape[1] != q.shape[1]:
        if _SDPA_GQA and attn_mask is None:  # no K/V copies for grouped-query attention
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale,
                                                  enable_gqa=True)
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                          scale=scale)


def _varlen_cuda(q, k, v, cu_seqlens, scale, window=None):
    """FlashAttention varlen through torch.nn.attention.varlen when this torch has it; with
    `window`, its native sliding window (None when this torch's varlen_attn takes no window)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    if q.dtype not in (torch.float16, torch.bfloat16):
        return None
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max().item())
    if k.shape[2] != q.shape[2]:
        rep = q.shape[2] // k.shape[2]
        k = k.repeat_interleave(rep, dim=2)
        v = v.repeat_interleave(rep, dim=2)
    if window is not None:  # a query sees itself and the window - 1 keys before it
        try:
            out = varlen_attn(q[0], k[0], v[0], cu, cu, max_len, max_len, scale=scale,
                              window_size=(window - 1, 0))
        except TypeError:
            return None
        return out[None]
    try:
        out = varlen_attn(q[0], k[0], v[0], cu, cu, max_len, max_len, is_causal=True, scale=scale)
    except TypeError:  # newer signature: causal through window_size
        out = varlen_attn(q[0], k[0], v[0], cu, cu, max_len, max_len, scale=scale,
                          window_size=(-1, 0))
    return out[None]


def causal_attention(q, k, v, *, cu_seqlens=None, scale=None, window=None):
    """Causal attention without a cache. q: [B, T, H, D]; k, v: [B, T, Hkv, D].
    With `cu_seqlens` (B == 1) no query attends across a document boundary; with `window` a
    query sees at most `window` keys (its own included)."""
    if window is not None:
        longest = q.shape[1] if cu_seqlens is None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        if window < longest:  # else the window hides nothing: plain causal attention is exact
            if q.is_cuda and q.shape[0] == 1:  # flash attention's own window (packed rows)
                cu = cu_seqlens if cu_seqlens is not None else torch.tensor(
                    [0, q.shape[1]], device=q.device)
                out = _varlen_cuda(q, k, v, cu, scale, window=window)
                if out is not None:
                    return out
            return windowed_attention(q, k, v, window, cu_seqlens=cu_seqlens, scale=scale)
    if cu_seqlens is None:
        o = _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale)
        return o.transpose(1, 2)
    if q.is_cuda:
        out = _varlen_cuda(q, k, v, cu_seqlens, scale)
        if out is not None:
            return out
    offsets = cu_seqlens.tolist()
    outs = []
    for a, b in zip(offsets[:-1], offsets[1:]):
        if b > a:
            outs.append(causal_attention(q[:, a:b], k[:, a:b], v[:, a:b], scale=scale))
    return torch.cat(outs, 1) if outs else torch.empty_like(q)


def cached_attention(q, k_all, v_all, key_valid, scale=None, window=None):
    """Attention of the last Tq slots against S cached slots.

    q: [B, Tq, H, D] at slots S-Tq .. S-1; k_all, v_all: [B, Hkv, S, D] (cache layout);
    key_valid: [B, S] bool, False for padding. Causal by slot index; a query always sees its own
    slot so padded rows stay finite (their outputs are ignored). With `window`, a query sees only
    keys less than `window` real tokens (positions, padding not counted) behind it."""
    b, tq = q.shape[:2]
    s = k_all.shape[2]
    q_slot = torch.arange(s - tq, s, device=q.device)
    k_slot = torch.arange(s, device=q.device)
    causal = k_slot[None, :] <= q_slot[:, None]  # [Tq, S]
    mask = causal[None] & key_valid[:, None, :]
    if window is not None:
        pos = key_valid.long().cumsum(-1)  # [B, S]: real tokens up to each slot
        mask = mask & (pos[:, s - tq:, None] - pos[:, None, :] < window)
    mask = mask | (k_slot[None, :] == q_slot[:, None])[None]
    o = _sdpa(q.transpose(1, 2), k_all, v_all, attn_mask=mask[:, None], scale=scale)
    return o.transpose(1, 2)


def _document_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    cu = cu_seqlens.to(torch.long)
    return torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu[1:] - cu[:-1],
                                   output_size=total)


def windowed_attention(q, k, v, window: int, *, cu_seqlens=None, key_valid=None, scale=None,
                       block_size: int | None = None):
    """Sliding-window causal attention, by slot index. q: [B, Tq, H, D] at slots S-Tq .. S-1 of
    k, v: [B, S, Hkv, D] (Tq == S without a cache). A query at slot i sees slots i-window+1 .. i,
    within its document (`cu_seqlens`, B == 1) and where `key_valid` [B, S] is True; always its
    own slot. Queries go in blocks of `block_size` (default max(window, 256)) against the
    block + window - 1 keys they can see."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    tq, s = q.shape[1], k.shape[1]
    offset = s - tq
    docs = _document_ids(cu_seqlens, s).to(q.device) if cu_seqlens is not None else None
    block = block_size or max(window, 256)
    outs = []
    for qs in range(0, tq, block):
        qe = min(qs + block, tq)
        lo, hi = max(0, offset + qs - window + 1), offset + qe
        q_slot = torch.arange(offset + qs, hi, device=q.device)
        k_slot = torch.arange(lo, hi, device=q.device)
        dist = q_slot[:, None] - k_slot[None, :]
        mask = ((dist >= 0) & (dist < window))[None]  # [1, Cq, Ck]
        if docs is not None:
            mask = mask & (docs[q_slot][:, None] == docs[k_slot][None, :])[None]
        if key_valid is not None:
            mask = (mask & key_valid[:, None, lo:hi]) | (dist == 0)[None]
        o = _sdpa(q[:, qs:qe].transpose(1, 2), k[:, lo:hi].transpose(1, 2),
                  v[:, lo:hi].transpose(1, 2), attn_mask=mask[:, None], scale=scale)
        outs.append(o.transpose(1, 2))
    return torch.cat(outs, 1) if outs else torch.empty_like(q)
