"""Token-by-token recurrence S_t = lambda S_{t-1} + k_t^T v_t, o_t = q_t S_t: the definition."""

from __future__ import annotations

import torch

from .common import compute_dtype, split_documents


def _recurrent_one(q, k, v, slope, s0):
    b, t, h, d = q.shape
    e = v.shape[-1]
    lam = torch.exp(-slope)[None, :, None, None]
    state = torch.zeros(b, h, d, e, dtype=q.dtype, device=q.device) if s0 is None else s0
    outs = []
    for i in range(t):
        state = lam * state + k[:, i, :, :, None] * v[:, i, :, None, :]
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, i], state))
    o = torch.stack(outs, 1) if outs else q.new_zeros(b, 0, h, e)
    return o, state


def recurrent_lightning_attn(q, k, v, slope, initial_state=None, cu_seqlens=None):
    dt = compute_dtype(q)
    q_, k_, v_, sl = q.to(dt), k.to(dt), v.to(dt), slope.to(dt)
    s0 = None if initial_state is None else initial_state.to(dt)
    if cu_seqlens is None:
        o, state = _recurrent_one(q_, k_, v_, sl, s0)
        return o.to(q.dtype), state
    outs, states = [], []
    for n, (a, b) in enumerate(split_documents(cu_seqlens)):
        o, st = _recurrent_one(q_[:, a:b], k_[:, a:b], v_[:, a:b], sl, None if s0 is None else s0[n:n + 1])
        outs.append(o)
        states.append(st)
    return torch.cat(outs, 1).to(q.dtype), torch.cat(states, 0)
