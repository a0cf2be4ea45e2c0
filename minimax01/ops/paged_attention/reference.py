"""The plain-PyTorch paged attention: gather each sequence's pages into a contiguous cache, then
the slot-attention reference (SDPA per document). The reference for the Triton kernel and the
CPU path; `write_kv` (the scatter of new keys and values into pages) is used by every backend."""

from __future__ import annotations

import torch

from ..slot_attention.reference import torch_slot_attention


def write_kv(k_pages, v_pages, k, v, slot_mapping):
    """Scatter new keys/values into pages in place. k_pages, v_pages: [P, Hkv, page_size, D];
    k, v: [T, Hkv, D]; slot_mapping: [T] ints, token t goes to page slot_mapping[t] // page_size
    at offset slot_mapping[t] % page_size (padding rows point into the null page). One
    index_put per tensor, no host sync: safe inside a CUDA graph."""
    ps = k_pages.shape[2]
    slot_mapping = slot_mapping.to(device=k_pages.device, dtype=torch.int64)
    page, off = slot_mapping // ps, slot_mapping % ps
    k_pages[page, :, off] = k.to(k_pages.dtype)
    v_pages[page, :, off] = v.to(v_pages.dtype)


def gather_pages(pages, block_table, length: int) -> torch.Tensor:
    """[N, Hkv, length, D]: the first `length` tokens of each block-table row, contiguous."""
    n, width = block_table.shape
    ps = pages.shape[2]
    need = -(-length // ps)
    if need > width:
        raise ValueError(f"length {length} needs {need} pages, block table has {width}")
    rows = pages[block_table[:, :need].to(device=pages.device, dtype=torch.int64)]  # [N, np, Hkv, ps, D]
    rows = rows.transpose(1, 2).reshape(n, pages.shape[1], need * ps, pages.shape[3])
    return rows[:, :, :length]


def torch_paged_attention(q, k_pages, v_pages, block_table, ctx, qlen, scale):
    """q: [T, H, D] packed by document; k_pages, v_pages: [P, Hkv, page_size, D]; block_table:
    [N, W] int; ctx, qlen: [N]. Query i of document n (position ctx[n] + i) attends to keys
    0 .. ctx[n] + i of the pages block_table[n] lists; this step's keys are already written."""
    ctx, qlen = (x.tolist() if torch.is_tensor(x) else list(x) for x in (ctx, qlen))
    longest = max((c + n for c, n in zip(ctx, qlen)), default=0)
    keys = gather_pages(k_pages, block_table, longest)
    values = gather_pages(v_pages, block_table, longest)
    docs = list(range(len(ctx)))
    return torch_slot_attention(q, keys, values, docs, ctx, qlen, scale)
