"""Stitch segment states into start states: the cheap middle pass of a split sequence.

When a long document is cut into segments that run on separate programs, each segment but the
last (in scan order) first computes its local state from zero (scan_kernel with STATE_ONLY). A
segment's true start state is then the carry of the segments before it (after it, for the
backward's reverse scan):

    start[first] = s0;  start[p+1] = lam^len[p] * start[p] + local[p]

a scan over a handful of D x E matrices per document. The kernel overwrites each local state
with its start state in place; the main scan then starts every segment from its start state and
the document's last segment writes the final state (the initial state's gradient backward)."""

from __future__ import annotations

import triton.language as tl

from .triton_jit import kernel


@kernel
def combine_kernel(
    BUF, S0, ITEMS, DOC_FIRST, SLOPE,
    H, DK, DV,
    s0_r, s0_h, s0_k, s0_v,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    REVERSE: tl.constexpr, HAS_S0: tl.constexpr,
):
    pid = tl.program_id(0)
    nv = (DV + BLOCK_V - 1) // BLOCK_V
    nk = (DK + BLOCK_K - 1) // BLOCK_K
    iv = pid % nv
    rest = pid // nv
    ik = rest % nk
    rest = rest // nk
    h = rest % H
    doc = rest // H
    first = tl.load(DOC_FIRST + doc)
    last = tl.load(DOC_FIRST + doc + 1)
    c = -tl.load(SLOPE + h).to(tl.float32) * 1.4426950408889634

    ck = ik * BLOCK_K + tl.arange(0, BLOCK_K)
    cv = iv * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = (ck[:, None] < DK) & (cv[None, :] < DV)
    if HAS_S0:
        p0 = S0 + doc.to(tl.int64) * s0_r + h * s0_h + ck[:, None] * s0_k + cv[None, :] * s0_v
        carry = tl.load(p0, mask=mask, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)

    tile = h * DK * DV + ck[:, None] * DV + cv[None, :]
    n = last - first
    for j in range(0, n):
        if REVERSE:
            it = last - 1 - j
        else:
            it = first + j
        p = BUF + it.to(tl.int64) * (H * DK * DV) + tile
        more = j + 1 < n  # the last segment in scan order has no local state
        local = tl.load(p, mask=(mask & more) != 0, other=0.0)
        tl.store(p, carry, mask=mask)
        length = tl.load(ITEMS + 4 * it.to(tl.int64) + 1) - tl.load(ITEMS + 4 * it.to(tl.int64))
        carry = carry * tl.exp2(c * length.to(tl.float32)) + local
