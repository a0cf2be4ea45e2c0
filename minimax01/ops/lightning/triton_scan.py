"""The one block-scan kernel behind the Triton lightning-attention forward and backward.

Every pass of the op has the same shape: walk the blocks of a token range in order, keep a
DK x DV fp32 state in registers, and for each block emit

    out[i] = sum_{j<=i in block} lam^(i-j) (a_i . b_j) v_j  +  lam^(i+1-SHIFT) a_i S
    S      = lam^m S + sum_j b_j^T (lam^(m-1-j+SHIFT) v_j)

(i, j positions of the block in scan order, m rows in the block, SHIFT the REVERSE flag). With
(a, b, v) = (q, k, v) in time order this is the forward (o, S); with (do, v, k) it is dq (state
S^T); walking time backwards with SHIFT = 1, (k, q, do) gives dv and (v, do, q) gives dk, the
state being lam * dS (so that it starts at the final state's gradient and ends at the initial
state's gradient). The decay is a per-head constant, so every factor is a closed-form exp2 -- no
cumulative sums.

Blocks are aligned to the start of the range in both directions and their rows are loaded in
ascending token order (what TMA loads need); walking backwards, row r of an m-row block is scan
position m-1-r, so the reverse decay matrix is the transpose of the forward one and the ragged
block is the first one visited.

One program owns one (work item, head, BLOCK_V columns of the value dim). A work item is a token
range inside one document (triton_items.py): a whole document, or a segment of a long one. With
STATE_ONLY the kernel skips `a` and `out` and only writes the item's local state (not for the
document's last item in scan order, whose local state nobody reads). Otherwise the item's last
program in scan order writes the document's final state (STORE_S)."""

from __future__ import annotations

import triton.language as tl

from .triton_items import item_bounds
from .triton_jit import kernel


@kernel
def scan_kernel(
    A, B, V, O, S_IN, S_OUT, CU, ITEMS, ORDER, SLOPE,
    H, seq_len, n_tok, stride_ab_t, stride_vo_t,
    sin_r, sin_h, sin_k, sin_v,
    sout_r, sout_h, sout_k, sout_v,
    DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    MODE: tl.constexpr, HAS_ORDER: tl.constexpr,
    REVERSE: tl.constexpr, STATE_ONLY: tl.constexpr, HAS_S_IN: tl.constexpr,
    SIN_BY_ITEM: tl.constexpr, STORE_S: tl.constexpr, USE_TMA: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    nv = (DV + BLOCK_V - 1) // BLOCK_V
    iv = pid % nv
    rest = pid // nv
    h = rest % H
    item = rest // H
    start, end, doc, flags = item_bounds(CU, ITEMS, ORDER, item, seq_len, n_tok, MODE, HAS_ORDER)
    real = (flags & 4) != 0
    # the document's last item in scan order: its last segment forward, its first one backward
    last_bit = flags & (1 if REVERSE else 2)
    last = last_bit != 0
    # log2 of the decay: lam^n = exp2(c * n)
    c = -tl.load(SLOPE + h).to(tl.float32) * 1.4426950408889634

    r = tl.arange(0, BLOCK_T)
    ck = tl.arange(0, BLOCK_K)
    cv = iv * BLOCK_V + tl.arange(0, BLOCK_V)
    mk = ck < DK
    mv = cv < DV
    mkv = mk[:, None] & mv[None, :]

    if HAS_S_IN:
        row_in = item if SIN_BY_ITEM else doc
        p_in = (S_IN + row_in.to(tl.int64) * sin_r + h * sin_h + ck[:, None] * sin_k
                + cv[None, :] * sin_v)
        S = tl.load(p_in, mask=(mkv & real) != 0, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)

    # block-invariant decays lam^(scan distance) on and below the scan-order diagonal
    if REVERSE:
        diff = r[None, :] - r[:, None]
    else:
        diff = r[:, None] - r[None, :]
    dmat = tl.where(diff >= 0, tl.exp2(c * tl.maximum(diff, 0).to(tl.float32)), 0.0)

    O_h = O + h * DV
    n_blk = tl.where(real, (end - start + BLOCK_T - 1) // BLOCK_T, 0)
    if STATE_ONLY:
        n_blk = tl.where(last, 0, n_blk)
    for i in range(0, n_blk):
        if REVERSE:
            lo = start + (n_blk - 1 - i) * BLOCK_T
        else:
            lo = start + i * BLOCK_T
        m = tl.minimum(end - lo, BLOCK_T)
        valid = r < m
        if REVERSE:  # scan position m-1-r
            qexp = m - 1 - r
            kexp = r + 1
        else:
            qexp = r + 1
            kexp = m - 1 - r
        t64 = (lo + r).to(tl.int64)
        # column masks only where a head dim is not a power of two: row-only masks keep the
        # loads 16-byte vectorised
        if DK == BLOCK_K:
            m_ab = valid[:, None]
        else:
            m_ab = valid[:, None] & mk[None, :]
        if DV % BLOCK_V == 0:
            m_vo = valid[:, None]
        else:
            m_vo = valid[:, None] & mv[None, :]
        if USE_TMA:  # rows past the range belong to the next document: zero them
            b = tl.where(valid[:, None], B.load([lo.to(tl.int32), h * DK]), 0.0)
            v = tl.where(valid[:, None], V.load([lo.to(tl.int32), h * DV + iv * BLOCK_V]), 0.0)
        else:
            b = tl.load(B + h * DK + t64[:, None] * stride_ab_t + ck[None, :], mask=m_ab,
                        other=0.0)
            v = tl.load(V + h * DV + t64[:, None] * stride_vo_t + cv[None, :], mask=m_vo,
                        other=0.0)
        if not STATE_ONLY:
            if USE_TMA:
                a = tl.where(valid[:, None], A.load([lo.to(tl.int32), h * DK]), 0.0)
            else:
                a = tl.load(A + h * DK + t64[:, None] * stride_ab_t + ck[None, :], mask=m_ab,
                            other=0.0)
            qdec = tl.where(valid, tl.exp2(c * qexp.to(tl.float32)), 0.0)
            scores = tl.dot(a, tl.trans(b), input_precision=PREC) * dmat
            out = tl.dot(a, S.to(a.dtype), input_precision=PREC) * qdec[:, None]
            out = tl.dot(scores.to(v.dtype), v, out, input_precision=PREC)
            tl.store(O_h + t64[:, None] * stride_vo_t + cv[None, :], out.to(O.dtype.element_ty),
                     mask=m_vo)
        # the key decays scale v, not b: b^T stays a shared-memory operand (on Hopper a scaled b
        # would be a 128 x 64 register operand: ~50 more registers per thread, and spills)
        kdec = tl.where(valid, tl.exp2(c * kexp.to(tl.float32)), 0.0)
        vd = (v * kdec[:, None]).to(v.dtype)
        S = tl.dot(tl.trans(b), vd, S * tl.exp2(c * m.to(tl.float32)), input_precision=PREC)

    if STATE_ONLY:
        keep = real & (last_bit == 0)
        row_out = item
    else:
        keep = real & last
        row_out = doc
    if STORE_S:
        p_out = (S_OUT + row_out.to(tl.int64) * sout_r + h * sout_h + ck[:, None] * sout_k
                 + cv[None, :] * sout_v)
        tl.store(p_out, S, mask=(mkv & keep) != 0)
