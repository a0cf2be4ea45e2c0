"""Softmax attention of packed queries against paged K/V (issue 18; SPEC §4, §7).

A softmax layer's keys and values live in pages `[P, Hkv, page_size, D]` (infer/pool.py hands
them out); document n's token at position p is in page `block_table[n, p // page_size]` at offset
`p % page_size`. A step hands in packed queries `[T, H, D]`: document n has `qlen[n]` queries, the
first at position `ctx[n]` (tokens cached before this step), and this step's keys are already
written (`write_kv`). Query at position p sees keys 0..p of its own document: one rule for a
decode step (one query), a prefill chunk continuing a cached prefix, and shared prefix pages
(several block tables naming the same page).

Two implementations compute the same thing (the ops/lightning/ pattern):
  * `torch_paged_attention` (reference.py): gathers the pages, then SDPA per document;
  * `triton_paged_attention` (triton_kernel.py): one launch for the batch, split over the keys
    for long contexts; graph-capturable when the program list is given. Compiled on CUDA,
    interpreted on the CPU (ops/triton_jit.py).
Arguments, program list (`work_list`) and splits (`decode_splits`) are slot attention's, with
`block_table` in place of `slot`.

Importing this package never imports triton."""

from __future__ import annotations

import torch

from ..slot_attention import decode_splits, triton_supported, work_list
from .reference import gather_pages, torch_paged_attention, write_kv

__all__ = ["paged_attention", "torch_paged_attention", "triton_paged_attention",
           "triton_supported", "write_kv", "gather_pages", "decode_splits", "work_list",
           "BACKENDS"]

BACKENDS = ("torch", "triton")


def triton_paged_attention(q, k_pages, v_pages, block_table, ctx, qlen, scale, *, work=None,
                           block_m=None, num_splits=1, block_n=None):
    """q: [T, H, D]; k_pages, v_pages: [P, Hkv, page_size, D]; block_table: [N, W] int32;
    ctx, qlen: [N] int32 device tensors. `work` = (work_doc, work_q), the program list (built
    from host lengths when None: a host sync); `block_m` queries per program (1 for decode)."""
    from .triton_kernel import launch

    return launch(q, k_pages, v_pages, block_table, ctx, qlen, scale, work=work, block_m=block_m,
                  num_splits=num_splits, block_n=block_n)


def paged_attention(q, k_pages, v_pages, block_table, ctx, qlen, scale, *, backend=None,
                    **kernel_args):
    """The one entry point: `backend` "triton" or "torch" (None: Triton on CUDA when it takes
    the shapes, else torch). `kernel_args` (work, block_m, num_splits, block_n) go to the kernel."""
    if backend is None:
        backend = "triton" if q.is_cuda and triton_supported(q, k_pages) else "torch"
    if backend == "triton":
        return triton_paged_attention(q, k_pages, v_pages, block_table, ctx, qlen, scale,
                                      **kernel_args)
    if backend == "torch":
        return torch_paged_attention(q, k_pages, v_pages, block_table, ctx, qlen, scale)
    raise ValueError(f"unknown paged attention backend {backend!r}; choose from {BACKENDS}")
