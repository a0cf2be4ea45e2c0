"""The Triton slot-attention kernel (the reference is reference.py, the entry point __init__.py,
the program list work.py).

One program: BLOCK_M queries of one document x the G query heads of one KV head, over one of
NUM_SPLITS key ranges; flash-style online softmax in fp32 (exp2 with the log2 e folded into the
scale). With NUM_SPLITS > 1 each split writes its partial max, sum and accumulator and
`_merge_splits` combines them. Nothing here reads a length on the host when the program list is
given, so a decode step can be captured in a CUDA graph."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_jit import kernel
from .work import work_list


@kernel
def _slot_attn_fwd(Q, K, V, O, Mp, Lp, Ap, work_doc, work_q, doc_slot, doc_qoff, doc_qlen,
                   doc_ctx, scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_ks,
                   stride_kh, stride_kl, stride_vs, stride_vh, stride_vl, num_tokens,
                   G: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr,
                   BLOCK_N: tl.constexpr, D: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """One program: BLOCK_M queries of one document x the G query heads of one KV head (rows =
    query-major, head-minor), over one of NUM_SPLITS ranges of the visible keys."""
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    doc = tl.load(work_doc + pid)
    q0 = tl.load(work_q + pid)
    slot = tl.load(doc_slot + doc).to(tl.int64)
    qoff = tl.load(doc_qoff + doc)
    qlen = tl.load(doc_qlen + doc)
    ctx = tl.load(doc_ctx + doc)

    r = tl.arange(0, ROWS)
    i = r // G
    head = kvh * G + r % G
    row_ok = (r < BLOCK_M * G) & (q0 + i < qlen)
    tok = (qoff + q0 + i).to(tl.int64)
    d = tl.arange(0, D)
    q = tl.load(Q + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)
    pos = ctx + q0 + i
    kv_end = ctx + tl.minimum(q0 + BLOCK_M, qlen)  # keys seen by the last query of the block
    per = ((kv_end + NUM_SPLITS - 1) // NUM_SPLITS + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    lo = split * per
    hi = tl.minimum(lo + per, kv_end)

    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, D], dtype=tl.float32)
    k_base = K + slot * stride_ks + kvh * stride_kh
    v_base = V + slot * stride_vs + kvh * stride_vh
    qk_scale = scale * 1.4426950408889634  # exp(x) = exp2(x * log2 e)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        k = tl.load(k_base + n[None, :].to(tl.int64) * stride_kl + d[:, None], mask=n_ok[None, :],
                    other=0.0)
        s = tl.dot(q, k.to(q.dtype)) * qk_scale
        s = tl.where((n[None, :] <= pos[:, None]) & n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + n[:, None].to(tl.int64) * stride_vl + d[None, :], mask=n_ok[:, None],
                    other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if NUM_SPLITS == 1:
        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(O + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 o.to(O.dtype.element_ty), mask=row_ok[:, None])
    else:  # partial results [NUM_SPLITS, T, H, (D)], merged by _merge_splits
        h_total = G * tl.num_programs(1)
        row = (split * num_tokens + tok) * h_total + head
        tl.store(Mp + row, m_i, mask=row_ok)
        tl.store(Lp + row, l_i, mask=row_ok)
        tl.store(Ap + row[:, None] * D + d[None, :], acc, mask=row_ok[:, None])


def _merge_splits(m, lse_l, acc, out_dtype):
    """Combine per-split softmax partials: m, l [NS, T, H], acc [NS, T, H, D]."""
    top = m.max(0).values
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    w = torch.exp2(m - top)
    denom = (w * lse_l).sum(0)
    o = (w[..., None] * acc).sum(0) / torch.where(denom == 0, torch.ones_like(denom), denom)[..., None]
    return o.to(out_dtype)


def launch(q, keys, values, slot, ctx, qlen, scale, *, work=None, block_m=None, num_splits=1,
           block_n=None):
    """`triton_slot_attention` (see __init__.py for the arguments)."""
    t, h, d = q.shape
    hkv = keys.shape[1]
    g = h // hkv
    if block_m is None:
        block_m = max(1, 64 // g) if t > len(slot) else 1
    rows = max(16, triton.next_power_of_2(block_m * g))
    if work is None:
        work = work_list(qlen.tolist(), block_m, q.device)
    work_doc, work_q = work
    programs = work_doc.shape[0]
    qoff = torch.cumsum(qlen, 0, dtype=torch.int32) - qlen
    o = torch.empty_like(q)
    if num_splits > 1:
        mp = torch.empty(num_splits, t, h, device=q.device, dtype=torch.float32)
        lp = torch.empty_like(mp)
        ap = torch.empty(num_splits, t, h, d, device=q.device, dtype=torch.float32)
    else:
        mp = lp = ap = o
    if block_n is None:
        block_n = 64 if q.is_cuda else 16
    if programs:
        _slot_attn_fwd.at(q.device)[(programs, hkv, num_splits)](
            q, keys, values, o, mp, lp, ap, work_doc, work_q, slot, qoff, qlen, ctx, float(scale),
            q.stride(0), q.stride(1), o.stride(0), o.stride(1),
            keys.stride(0), keys.stride(1), keys.stride(2),
            values.stride(0), values.stride(1), values.stride(2), t,
            G=g, BLOCK_M=block_m, ROWS=rows, BLOCK_N=block_n, D=d, NUM_SPLITS=num_splits,
            **({"num_warps": 8 if rows >= 64 else 4, "num_stages": 2} if q.is_cuda else {}))
    if num_splits > 1:
        return _merge_splits(mp, lp, ap, q.dtype)
    return o
