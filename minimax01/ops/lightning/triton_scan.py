"""The one block-scan kernel behind the Triton lightning-attention forward and backward.

Every pass of the op has the same shape: walk the blocks of a token range in order, keep a
DK x DV fp32 state in registers, and for each block emit

    out[i] = sum_{j<=i in block} lam^(i-j) (a_i . b_j) v_j  +  lam^(i+1-SHIFT) a_i S
    S      = lam^m S + sum_j lam^(m-1-j+SHIFT) b_j^T v_j

(i, j rows of the block in scan order, m rows in the block, SHIFT the REVERSE flag). With
(a, b, v) = (q, k, v) in time order this is the forward (o, S); with (do, v, k) it is dq (state
S^T); walking time backwards with SHIFT = 1, (k, q, do) gives dv and (v, do, q) gives dk, the
state being lam * dS (so that it starts at the final state's gradient and ends at the initial
state's gradient). The decay is a
per-head constant, so every factor is a closed-form exp2 -- no cumulative sums.

One program owns one (work item, head, BLOCK_V columns of the value dim). A work item is a token
range [start, end) inside one document: a whole document, or a segment of a long one when the
sequence is split over more programs (see triton_plan.py and triton_combine.py). With
STATE_ONLY the kernel skips `a` and `out` and only produces the item's local state."""

from __future__ import annotations

import triton.language as tl

from .triton_jit import kernel


@kernel
def scan_kernel(
    A, B, V, O, S_IN, S_OUT, ITEMS, SLOPE,
    H, stride_ab_t, stride_vo_t,
    sin_r, sin_h, sin_k, sin_v,
    sout_r, sout_h, sout_k, sout_v,
    DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    REVERSE: tl.constexpr, STATE_ONLY: tl.constexpr, HAS_S_IN: tl.constexpr,
    STORE_S: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    nv = (DV + BLOCK_V - 1) // BLOCK_V
    iv = pid % nv
    rest = pid // nv
    h = rest % H
    item = rest // H
    start = tl.load(ITEMS + 2 * item)
    end = tl.load(ITEMS + 2 * item + 1)
    # log2 of the decay: lam^n = exp2(c * n)
    c = -tl.load(SLOPE + h).to(tl.float32) * 1.4426950408889634

    r = tl.arange(0, BLOCK_T)
    ck = tl.arange(0, BLOCK_K)
    cv = iv * BLOCK_V + tl.arange(0, BLOCK_V)
    mk = ck < DK
    mv = cv < DV
    mkv = mk[:, None] & mv[None, :]

    if HAS_S_IN:
        p_in = (S_IN + item.to(tl.int64) * sin_r + h * sin_h + ck[:, None] * sin_k
                + cv[None, :] * sin_v)
        S = tl.load(p_in, mask=mkv, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)

    # block-invariant decays: lam^(i-j) on and below the diagonal, lam^(i+1-shift) for the state
    diff = r[:, None] - r[None, :]
    dmat = tl.where(diff >= 0, tl.exp2(c * tl.maximum(diff, 0).to(tl.float32)), 0.0)
    qdec = tl.exp2(c * (r + 1 - REVERSE).to(tl.float32))

    A_h = A + h * DK
    B_h = B + h * DK
    V_h = V + h * DV
    O_h = O + h * DV
    n_blk = (end - start + BLOCK_T - 1) // BLOCK_T
    for i in range(0, n_blk):
        if REVERSE:
            hi = end - i * BLOCK_T
            m = tl.minimum(hi - start, BLOCK_T)
            tok = hi - 1 - r
        else:
            lo = start + i * BLOCK_T
            m = tl.minimum(end - lo, BLOCK_T)
            tok = lo + r
        valid = r < m
        t64 = tok.to(tl.int64)
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
        b = tl.load(B_h + t64[:, None] * stride_ab_t + ck[None, :], mask=m_ab, other=0.0)
        v = tl.load(V_h + t64[:, None] * stride_vo_t + cv[None, :], mask=m_vo, other=0.0)
        if not STATE_ONLY:
            a = tl.load(A_h + t64[:, None] * stride_ab_t + ck[None, :], mask=m_ab, other=0.0)
            scores = tl.dot(a, tl.trans(b), input_precision=PREC) * dmat
            out = tl.dot(a, S.to(a.dtype), input_precision=PREC) * qdec[:, None]
            out = tl.dot(scores.to(v.dtype), v, out, input_precision=PREC)
            tl.store(O_h + t64[:, None] * stride_vo_t + cv[None, :], out.to(O.dtype.element_ty),
                     mask=m_vo)
        kdec = tl.where(valid, tl.exp2(c * (m - 1 + REVERSE - r).to(tl.float32)), 0.0)
        bd = (b * kdec[:, None]).to(b.dtype)
        S = tl.dot(tl.trans(bd), v, S * tl.exp2(c * m.to(tl.float32)), input_precision=PREC)

    if STORE_S:
        p_out = (S_OUT + item.to(tl.int64) * sout_r + h * sout_h + ck[:, None] * sout_k
                 + cv[None, :] * sout_v)
        tl.store(p_out, S, mask=mkv)
