"""The Triton paged-attention kernel (the reference is reference.py, the entry point
__init__.py; the program list and the split merge are slot attention's, ops/slot_attention).

The slot kernel with one change: key n of document `doc` is read from page
`block_table[doc, n // PAGE]` at offset `n % PAGE` instead of row `slot` at offset n. One
program: BLOCK_M queries of one document x the G query heads of one KV head, over one of
NUM_SPLITS key ranges; online softmax in fp32 with exp2. No host reads when the program list is
given, so a decode step can be captured in a CUDA graph."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..slot_attention.triton_kernel import _merge_splits
from ..slot_attention.work import work_list
from ..triton_jit import kernel


@kernel
def _paged_attn_fwd(Q, K, V, O, Mp, Lp, Ap, work_doc, work_q, BT, doc_qoff, doc_qlen, doc_ctx,
                    scale, stride_bt, width, stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_kp, stride_kh, stride_kl, stride_vp, stride_vh, stride_vl, num_tokens,
                    G: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr,
                    BLOCK_N: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                    NUM_SPLITS: tl.constexpr):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    doc = tl.load(work_doc + pid)
    q0 = tl.load(work_q + pid)
    qoff = tl.load(doc_qoff + doc)
    qlen = tl.load(doc_qlen + doc)
    ctx = tl.load(doc_ctx + doc)
    bt = BT + doc.to(tl.int64) * stride_bt

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
    kv_end = tl.minimum(kv_end, width * PAGE)      # never past the block table
    per = ((kv_end + NUM_SPLITS - 1) // NUM_SPLITS + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    lo = split * per
    hi = tl.minimum(lo + per, kv_end)

    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, D], dtype=tl.float32)
    k_head = K + kvh * stride_kh
    v_head = V + kvh * stride_vh
    qk_scale = scale * 1.4426950408889634  # exp(x) = exp2(x * log2 e)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        page = tl.load(bt + n // PAGE, mask=n_ok, other=0).to(tl.int64)
        off = (n % PAGE).to(tl.int64)
        k = tl.load(k_head + page[None, :] * stride_kp + off[None, :] * stride_kl + d[:, None],
                    mask=n_ok[None, :], other=0.0)
        s = tl.dot(q, k.to(q.dtype)) * qk_scale
        s = tl.where((n[None, :] <= pos[:, None]) & n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_head + page[:, None] * stride_vp + off[:, None] * stride_vl + d[None, :],
                    mask=n_ok[:, None], other=0.0)
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


def launch(q, k_pages, v_pages, block_table, ctx, qlen, scale, *, work=None, block_m=None,
           num_splits=1, block_n=None):
    """`triton_paged_attention` (see __init__.py for the arguments)."""
    t, h, d = q.shape
    hkv, page = k_pages.shape[1], k_pages.shape[2]
    g = h // hkv
    if block_m is None:
        block_m = max(1, 64 // g) if t > block_table.shape[0] else 1
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
        _paged_attn_fwd.at(q.device)[(programs, hkv, num_splits)](
            q, k_pages, v_pages, o, mp, lp, ap, work_doc, work_q, block_table, qoff, qlen, ctx,
            float(scale), block_table.stride(0), block_table.shape[1],
            q.stride(0), q.stride(1), o.stride(0), o.stride(1),
            k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
            v_pages.stride(0), v_pages.stride(1), v_pages.stride(2), t,
            G=g, BLOCK_M=block_m, ROWS=rows, BLOCK_N=block_n, D=d, PAGE=page,
            NUM_SPLITS=num_splits,
            **({"num_warps": 8 if rows >= 64 else 4, "num_stages": 2} if q.is_cuda else {}))
    if num_splits > 1:
        return _merge_splits(mp, lp, ap, q.dtype)
    return o
