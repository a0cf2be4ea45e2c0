"""The plain-PyTorch slot attention: the reference for the Triton kernel and the CPU path."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def torch_slot_attention(q, keys, values, slot, ctx, qlen, scale):
    """q: [T, H, D]; keys, values: [S, Hkv, L, D]; slot, ctx, qlen: [N] ints (lists or
    tensors). Returns o [T, H, D]: query i of document n (at position ctx[n] + i) attends to
    keys 0 .. ctx[n] + i of slot slot[n]."""
    slot, ctx, qlen = (x.tolist() if torch.is_tensor(x) else list(x) for x in (slot, ctx, qlen))
    out = torch.empty_like(q)
    h, hkv = q.shape[1], keys.shape[1]
    start = 0
    for s, c, n in zip(slot, ctx, qlen):
        if n == 0:
            continue
        qd = q[start:start + n].transpose(0, 1)[None]       # [1, H, n, D]
        k = keys[s, :, :c + n][None]                          # [1, Hkv, c+n, D] (a view)
        v = values[s, :, :c + n][None]
        if hkv != h:
            k = k.repeat_interleave(h // hkv, dim=1)
            v = v.repeat_interleave(h // hkv, dim=1)
        qpos = torch.arange(c, c + n, device=q.device)
        mask = torch.arange(c + n, device=q.device)[None, :] <= qpos[:, None]
        o = F.scaled_dot_product_attention(qd, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                           scale=scale)
        out[start:start + n] = o[0].transpose(0, 1)
        start += n
    return out
