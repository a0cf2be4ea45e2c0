"""Work items of a split packed sequence, built on the device from `cu_seqlens`.

When the document offsets live on the GPU the host cannot read them without a sync, so the host
only fixes the segment length L and an upper bound on the number of items
(n_docs + T // L >= sum_d max(1, ceil(len_d / L))); this one-program kernel writes the table:

    items[j]     = (start, end, doc, flags)   flags: 1 first item of its document, 2 last, 4 real
    doc_first[d] = index of document d's first item (doc_first[n_docs] = number of real items)

Items past the real count are (0, 0, n_docs, 0): the scans skip them. Each document's offsets
are clamped into [0, T] (end >= start), and no item is written past the bound: bad offsets
(out of order, overlapping documents, whose item count the bound does not cover) give wrong
numbers, never out-of-bounds accesses (tests/test_lightning_bounds.py checks every access)."""

from __future__ import annotations

import triton.language as tl
from triton.runtime.jit import JITFunction

from .triton_jit import kernel


@kernel
def items_kernel(CU, ITEMS, DOC_FIRST, n_docs, n_items, n_tok, seg_len, BLOCK: tl.constexpr):
    lane = tl.arange(0, BLOCK)
    carry = tl.sum(lane * 0, axis=0)  # int32 zero, a tensor so the loop-carried type is fixed
    tl.store(DOC_FIRST + lane, carry + lane * 0, mask=lane == 0)
    for c0 in range(0, n_docs, BLOCK):
        d = c0 + lane
        md = d < n_docs
        a = tl.load(CU + d, mask=md, other=0).to(tl.int64)
        b = tl.load(CU + d + 1, mask=md, other=0).to(tl.int64)
        a = tl.minimum(tl.maximum(a, 0), n_tok)
        b = tl.minimum(tl.maximum(b, a), n_tok)
        n_seg = tl.where(md, tl.maximum((b - a + seg_len - 1) // seg_len, 1), 0).to(tl.int32)
        incl = tl.cumsum(n_seg, axis=0) + carry
        first = incl - n_seg
        tl.store(DOC_FIRST + d + 1, tl.minimum(incl, n_items), mask=md)
        for s in range(0, tl.max(n_seg, axis=0)):
            sv = n_seg * 0 + s  # the segment index as a vector
            # the bound holds for offsets in order; overlapping bad ones could pass it
            ms = md & (sv < n_seg) & (first + sv < n_items)
            it = (first + sv).to(tl.int64) * 4
            lo = a + sv.to(tl.int64) * seg_len
            hi = tl.minimum(lo + seg_len, b)
            flags = 4 + (sv == 0).to(tl.int32) + 2 * (sv == n_seg - 1).to(tl.int32)
            tl.store(ITEMS + it, lo.to(tl.int32), mask=ms)
            tl.store(ITEMS + it + 1, hi.to(tl.int32), mask=ms)
            tl.store(ITEMS + it + 2, d, mask=ms)
            tl.store(ITEMS + it + 3, flags, mask=ms)
        carry += tl.sum(n_seg, axis=0)
    for j0 in range(carry, n_items, BLOCK):
        j = j0 + lane
        mj = j < n_items
        it = j.to(tl.int64) * 4
        zero = j * 0
        tl.store(ITEMS + it, zero, mask=mj)
        tl.store(ITEMS + it + 1, zero, mask=mj)
        tl.store(ITEMS + it + 2, zero + n_docs, mask=mj)
        tl.store(ITEMS + it + 3, zero, mask=mj)


def _item_bounds(CU, ITEMS, ORDER, item, seq_len, n_tok,
                 MODE: tl.constexpr, HAS_ORDER: tl.constexpr):
    """(start, end, doc, flags) of work item `item`, offsets int64. MODE 0: rows of a [B, T]
    batch (item b = tokens [b T, (b+1) T)); 1: documents of cu_seqlens (optionally in the order
    ORDER); 2: a segment table (above)."""
    if MODE == 0:
        doc = item
        start = item.to(tl.int64) * seq_len
        end = start + seq_len
        flags = doc * 0 + 7
    elif MODE == 1:
        doc = item
        if HAS_ORDER:
            doc = tl.load(ORDER + item)
        start = tl.load(CU + doc).to(tl.int64)
        end = tl.load(CU + doc + 1).to(tl.int64)
        start = tl.minimum(tl.maximum(start, 0), n_tok)
        end = tl.minimum(tl.maximum(end, start), n_tok)
        flags = doc * 0 + 7
    else:
        p = ITEMS + item.to(tl.int64) * 4
        start = tl.load(p).to(tl.int64)
        end = tl.load(p + 1).to(tl.int64)
        doc = tl.load(p + 2)
        flags = tl.load(p + 3)
    return start, end, doc, flags


item_bounds = JITFunction(_item_bounds)
