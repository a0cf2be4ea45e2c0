"""Fused reverse scan of the backward: dk and dv from one walk over q, k, v, do.

The separate dv and dk passes (triton_scan.py with (k, q, do) and (v, do, q)) carry the same
state R = lam * dS, once as R and once as R^T, and each value tile of each pass re-reads its
operands and recomputes its score tile. Here one program owns a (work item, head) and all of R
(DK x DV fp32, so DV is not tiled: dk contracts over the value dim) and per block computes

    dv = (k q^T * M^T) do + lam^(pos) (k R)        dk = (v do^T * M^T) q + lam^(pos) (v R^T)
    R  = lam^m R + q^T (lam^(pos') do)

with the reverse block layout of the scan kernel (ascending rows, scan position m-1-r). The
program's work is a whole head's, so few heads or long documents need the sequence split
(`fused_programs_per_sm` in the tuning) to fill the GPU."""

from __future__ import annotations

import triton.language as tl

from .triton_items import item_bounds
from .triton_jit import kernel


@kernel
def dkdv_kernel(
    Q, K, V, DO, DQK, DVO, S_IN, S_OUT, CU, ITEMS, ORDER, SLOPE,
    H, seq_len, n_tok, stride_qk_t, stride_v_t,
    sin_r, sin_h, sin_k, sin_v,
    sout_r, sout_h, sout_k, sout_v,
    DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    MODE: tl.constexpr, HAS_ORDER: tl.constexpr, HAS_S_IN: tl.constexpr,
    SIN_BY_ITEM: tl.constexpr, STORE_S: tl.constexpr, USE_TMA: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    h = pid % H
    item = pid // H
    start, end, doc, flags = item_bounds(CU, ITEMS, ORDER, item, seq_len, n_tok, MODE, HAS_ORDER)
    real = (flags & 4) != 0
    last = (flags & 1) != 0  # reverse scan: the document's first item is visited last
    c = -tl.load(SLOPE + h).to(tl.float32) * 1.4426950408889634

    r = tl.arange(0, BLOCK_T)
    ck = tl.arange(0, BLOCK_K)
    cv = tl.arange(0, BLOCK_V)
    mk = ck < DK
    mv = cv < DV
    mkv = mk[:, None] & mv[None, :]

    if HAS_S_IN:
        row_in = item if SIN_BY_ITEM else doc
        p_in = (S_IN + row_in.to(tl.int64) * sin_r + h * sin_h + ck[:, None] * sin_k
                + cv[None, :] * sin_v)
        R = tl.load(p_in, mask=(mkv & real) != 0, other=0.0).to(tl.float32)
    else:
        R = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)

    diff = r[None, :] - r[:, None]  # reverse scan distance
    dmat = tl.where(diff >= 0, tl.exp2(c * tl.maximum(diff, 0).to(tl.float32)), 0.0)

    DQK_h = DQK + h * DK
    DVO_h = DVO + h * DV
    n_blk = tl.where(real, (end - start + BLOCK_T - 1) // BLOCK_T, 0)
    for i in range(0, n_blk):
        lo = start + (n_blk - 1 - i) * BLOCK_T
        m = tl.minimum(end - lo, BLOCK_T)
        valid = r < m
        t64 = (lo + r).to(tl.int64)
        if DK == BLOCK_K:
            m_k = valid[:, None]
        else:
            m_k = valid[:, None] & mk[None, :]
        if DV == BLOCK_V:
            m_v = valid[:, None]
        else:
            m_v = valid[:, None] & mv[None, :]
        if USE_TMA:
            row = lo.to(tl.int32)
            q = tl.where(valid[:, None], Q.load([row, h * DK]), 0.0)
            k = tl.where(valid[:, None], K.load([row, h * DK]), 0.0)
            v = tl.where(valid[:, None], V.load([row, h * DV]), 0.0)
            do = tl.where(valid[:, None], DO.load([row, h * DV]), 0.0)
        else:
            p_k = t64[:, None] * stride_qk_t + ck[None, :]
            p_v = t64[:, None] * stride_v_t + cv[None, :]
            q = tl.load(Q + h * DK + p_k, mask=m_k, other=0.0)
            k = tl.load(K + h * DK + p_k, mask=m_k, other=0.0)
            v = tl.load(V + h * DV + p_v, mask=m_v, other=0.0)
            do = tl.load(DO + h * DV + p_v, mask=m_v, other=0.0)
        qdec = tl.where(valid, tl.exp2(c * (m - 1 - r).to(tl.float32)), 0.0)
        kdec = tl.where(valid, tl.exp2(c * (r + 1).to(tl.float32)), 0.0)
        Rb = R.to(q.dtype)
        # dv = (k q^T * M) do + qdec (k R)
        s1 = tl.dot(k, tl.trans(q), input_precision=PREC) * dmat
        dv = tl.dot(k, Rb, input_precision=PREC) * qdec[:, None]
        dv = tl.dot(s1.to(do.dtype), do, dv, input_precision=PREC)
        tl.store(DVO_h + t64[:, None] * stride_v_t + cv[None, :], dv.to(DVO.dtype.element_ty),
                 mask=m_v)
        # dk = (v do^T * M) q + qdec (v R^T)
        s2 = tl.dot(v, tl.trans(do), input_precision=PREC) * dmat
        dk = tl.dot(v, tl.trans(Rb), input_precision=PREC) * qdec[:, None]
        dk = tl.dot(s2.to(q.dtype), q, dk, input_precision=PREC)
        tl.store(DQK_h + t64[:, None] * stride_qk_t + ck[None, :], dk.to(DQK.dtype.element_ty),
                 mask=m_k)
        dod = (do * kdec[:, None]).to(do.dtype)
        R = tl.dot(tl.trans(q), dod, R * tl.exp2(c * m.to(tl.float32)), input_precision=PREC)

    if STORE_S:
        p_out = (S_OUT + doc.to(tl.int64) * sout_r + h * sout_h + ck[:, None] * sout_k
                 + cv[None, :] * sout_v)
        tl.store(p_out, R, mask=(mkv & real & last) != 0)
