"""Chunked PyTorch form (SPEC §3 "Chunked form"): inside a block the quadratic left product, across
blocks the right product with a carried d x d state. Vectorised over blocks; a Python loop runs
only over blocks for the state scan. Differentiable by autograd; the CPU training path."""

from __future__ import annotations

import torch

from .common import compute_dtype, split_documents

DEFAULT_BLOCK = 64


def _blocks(q, k, v, slope, state, c):
    """T divisible by c. Returns (o [B, T, H, E], state after the last block)."""
    b, t, h, d = q.shape
    e = v.shape[-1]
    n = t // c
    qb = q.reshape(b, n, c, h, d).permute(0, 3, 1, 2, 4)  # [B, H, n, c, D]
    kb = k.reshape(b, n, c, h, d).permute(0, 3, 1, 2, 4)
    vb = v.reshape(b, n, c, h, e).permute(0, 3, 1, 2, 4)
    idx = torch.arange(c, device=q.device, dtype=q.dtype)
    sl = slope[:, None]  # [H, 1]
    diff = idx[:, None] - idx[None, :]
    intra_decay = torch.where(diff >= 0, torch.exp(-sl[:, :, None] * diff.clamp(min=0)),
                              torch.zeros((), dtype=q.dtype, device=q.device))  # [H, c, c]
    scores = (qb @ kb.transpose(-1, -2)) * intra_decay[None, :, None]
    o = scores @ vb
    key_decay = torch.exp(-sl * (c - 1 - idx))[None, :, None, :, None]  # [1, H, 1, c, 1]
    kv = (kb * key_decay).transpose(-1, -2) @ vb  # [B, H, n, D, E]
    block_decay = torch.exp(-slope * c)[None, :, None, None]
    prev = []
    for j in range(n):
        prev.append(state)
        state = block_decay * state + kv[:, :, j]
    query_decay = torch.exp(-sl * (idx + 1))[None, :, None, :, None]
    o = o + (qb * query_decay) @ torch.stack(prev, 2)
    return o.permute(0, 2, 3, 1, 4).reshape(b, t, h, e), state


def _chunk_one(q, k, v, slope, s0, block_size):
    b, t, h, d = q.shape
    e = v.shape[-1]
    state = s0 if s0 is not None else q.new_zeros(b, h, d, e)
    full = (t // block_size) * block_size
    outs = []
    if full:
        o, state = _blocks(q[:, :full], k[:, :full], v[:, :full], slope, state, block_size)
        outs.append(o)
    if t > full:
        o, state = _blocks(q[:, full:], k[:, full:], v[:, full:], slope, state, t - full)
        outs.append(o)
    o = torch.cat(outs, 1) if outs else q.new_zeros(b, 0, h, e)
    return o, state


def chunk_lightning_attn(q, k, v, slope, initial_state=None, cu_seqlens=None, block_size=None):
    block_size = block_size or DEFAULT_BLOCK
    dt = compute_dtype(q)
    q_, k_, v_, sl = q.to(dt), k.to(dt), v.to(dt), slope.to(dt)
    s0 = None if initial_state is None else initial_state.to(dt)
    if cu_seqlens is None:
        o, state = _chunk_one(q_, k_, v_, sl, s0, block_size)
        return o.to(q.dtype), state
    outs, states = [], []
    for n, (a, b) in enumerate(split_documents(cu_seqlens)):
        o, st = _chunk_one(q_[:, a:b], k_[:, a:b], v_[:, a:b], sl,
                           None if s0 is None else s0[n:n + 1], block_size)
        outs.append(o)
        states.append(st)
    return torch.cat(outs, 1).to(q.dtype), torch.cat(states, 0)
