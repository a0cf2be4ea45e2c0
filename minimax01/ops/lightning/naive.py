"""Quadratic reference: the masked decay matrix form, o = ((q k^T) * M) v, M[t,s] = lambda^(t-s)."""

from __future__ import annotations

import torch

from .common import compute_dtype, split_documents


def _naive_one(q, k, v, slope, s0):
    # q, k: [B, T, H, D]; v: [B, T, H, E]; s0: [B, H, D, E] or None. All in the compute dtype.
    t = q.shape[1]
    pos = torch.arange(t, device=q.device, dtype=q.dtype)
    diff = pos[:, None] - pos[None, :]
    s = slope.to(q.dtype)[:, None, None]
    decay = torch.where(diff >= 0, torch.exp(-s * diff.clamp(min=0)), torch.zeros((), dtype=q.dtype))
    scores = torch.einsum("bthd,bshd->bhts", q, k) * decay
    o = torch.einsum("bhts,bshe->bthe", scores, v)
    # decayed contribution of every key to the state after the last token
    key_decay = torch.exp(-s[:, :, 0] * (t - 1 - pos))  # [H, T]
    state = torch.einsum("bshd,hs,bshe->bhde", k, key_decay, v)
    if s0 is not None:
        q_decay = torch.exp(-s[:, :, 0] * (pos + 1))  # [H, T]
        o = o + torch.einsum("bthd,ht,bhde->bthe", q, q_decay, s0)
        state = state + torch.exp(-s * t)[None] * s0
    return o, state


def naive_lightning_attn(q, k, v, slope, initial_state=None, cu_seqlens=None):
    """Returns (o in q.dtype, final state [N, H, D, E] in fp32/fp64)."""
    dt = compute_dtype(q)
    q_, k_, v_, sl = q.to(dt), k.to(dt), v.to(dt), slope.to(dt)
    s0 = None if initial_state is None else initial_state.to(dt)
    if cu_seqlens is None:
        o, state = _naive_one(q_, k_, v_, sl, s0)
        return o.to(q.dtype), state
    outs, states = [], []
    for n, (a, b) in enumerate(split_documents(cu_seqlens)):
        o, st = _naive_one(q_[:, a:b], k_[:, a:b], v_[:, a:b], sl, None if s0 is None else s0[n:n + 1])
        outs.append(o)
        states.append(st)
    return torch.cat(outs, 1).to(q.dtype), torch.cat(states, 0)
