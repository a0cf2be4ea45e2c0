"""Softmax attention of a prefill chunk over the cached K/V through FlashAttention varlen
(issue 13; SPEC §4, §7). Prefill only: decode stays on the Triton slot/paged kernels.

The cache holds keys head-major (slot layout `[S, Hkv, L, D]`, paged `[P, Hkv, page_size, D]`
+ block table); flash wants them token-major and packed. So one step:
  1. `slot_kv_index` / `paged_kv_index` (once per step, on the device, lengths from the host
     lists the step record already holds: no host sync) name, for every visible key of every
     document (positions 0 .. ctx[n] + qlen[n] - 1, this step's keys already written), its cache
     row and column;
  2. `gather_kv` (once per layer) copies them into `[sum_k, Hkv, D]` (or `[sum_k, H, D]` when
     this torch's varlen_attn has no `enable_gqa`: the K/V heads are repeated in the same copy);
  3. `flash_prefill_attention` calls `torch.nn.attention.varlen.varlen_attn` with causal
     attention, which FlashAttention 2 aligns bottom-right for queries shorter than keys: query i
     of a document with ctx cached tokens sees keys 0 .. ctx + i (checked on the GPU by
     tests/test_prefill_attention.py and benchmarks/check_prefill_attention_gpu.py).
The gather is cheap next to the attention: it moves 2 * sum_k * Hkv * D elements twice (read,
write) while the attention does 4 * qlen * k * H * D FLOPs, a FLOPs/bytes ratio of qlen * G / 2
(G = H / Hkv) per element pair, thousands for a prefill chunk.

The twin is the slot/paged attention reference (`torch_slot_attention`, `torch_paged_attention`);
`torch_varlen_attn` (reference.py) stands in for varlen_attn on the CPU so the index math and the
wiring are tested without CUDA. Importing this package never imports triton."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .reference import torch_varlen_attn

__all__ = ["KVPlan", "slot_kv_index", "paged_kv_index", "gather_kv", "flash_prefill_attention",
           "prefill_attention", "flash_supported", "plan", "torch_varlen_attn", "VARLEN"]


def _load_varlen():
    """(varlen_attn, causal keyword arguments, takes enable_gqa) of this torch, or None. torch
    2.10 spells causal `is_causal=True`, 2.11+ `window_size=(-1, 0)`; `enable_gqa` came later."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    return varlen_attn, causal, "enable_gqa" in params


VARLEN = _load_varlen()


def flash_supported(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """True when varlen_attn exists and takes these tensors (CUDA, fp16/bf16 alike, D % 8 == 0,
    D <= 256); else the caller keeps the Triton kernel."""
    d = q.shape[-1]
    return (VARLEN is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and keys.dtype == q.dtype and d % 8 == 0 and d <= 256)


def _doc_and_pos(kv_len: torch.Tensor, total: int):
    """For every packed key: its document and its position there. kv_len [N] on the device;
    `total` = sum(kv_len), known on the host (output_size keeps repeat_interleave sync-free)."""
    dev = kv_len.device
    kv_len = kv_len.long()
    doc = torch.repeat_interleave(torch.arange(kv_len.shape[0], device=dev), kv_len,
                                  output_size=total)
    start = torch.cumsum(kv_len, 0) - kv_len
    return doc, torch.arange(total, device=dev) - start[doc]


def slot_kv_index(slot: torch.Tensor, kv_len: torch.Tensor, total: int):
    """(rows, cols) [total] long: key j of the packed order is `keys[rows[j], :, cols[j]]` of
    the slot layout (document n = slot[n], positions 0 .. kv_len[n] - 1)."""
    doc, pos = _doc_and_pos(kv_len, total)
    return slot.to(device=kv_len.device, dtype=torch.long)[doc], pos


def paged_kv_index(block_table: torch.Tensor, kv_len: torch.Tensor, total: int, page_size: int):
    """(rows, cols) [total] long into pages `[P, Hkv, page_size, D]`: document n's position p is
    page block_table[n, p // page_size], offset p % page_size (shared pages just repeat)."""
    doc, pos = _doc_and_pos(kv_len, total)
    return block_table[doc, pos // page_size].long(), pos % page_size


def gather_kv(keys, values, rows, cols, heads: torch.Tensor | None = None):
    """keys, values: [R, Hkv, C, D] (slots or pages) -> packed [total, Hkv, D] each; with
    `heads` [H] (the KV head of each query head) -> [total, H, D], GQA heads repeated."""
    if heads is None:
        return keys[rows, :, cols], values[rows, :, cols]
    r, c = rows[:, None], cols[:, None]
    return keys[r, heads[None, :], c], values[r, heads[None, :], c]


@dataclass
class KVPlan:
    """What every layer of one prefill step shares: the gather index and varlen's arguments."""

    rows: torch.Tensor
    cols: torch.Tensor
    heads: torch.Tensor | None   # set when the K/V heads are repeated in the gather
    cu_q: torch.Tensor           # [N + 1] int32
    cu_k: torch.Tensor           # [N + 1] int32
    max_q: int
    max_k: int


def plan(ctx: list[int], qlen: list[int], num_heads: int, kv_heads: int, device, *,
         slot: torch.Tensor | None = None, block_table: torch.Tensor | None = None,
         page_size: int | None = None, cu_q: torch.Tensor | None = None,
         kv_len: torch.Tensor | None = None, repeat_heads: bool | None = None) -> KVPlan:
    """The step's KVPlan from the host lengths (ctx[n] cached, qlen[n] new per document: the
    totals and maxima) and either `slot` [N] (slot layout) or `block_table` [N, W] + `page_size`
    (paged). With `cu_q` [N + 1] and `kv_len` [N] already on the device (the step record's) no
    host -> device copy happens, so building the plan inside the forward never waits on the
    GPU. `repeat_heads` None: repeat the K/V heads when varlen_attn has no enable_gqa."""
    kv = [c + n for c, n in zip(ctx, qlen)]
    if cu_q is None:
        cu_q = torch.tensor([0, *qlen], device=device).cumsum(0, dtype=torch.int32)
    if kv_len is None:
        kv_len = torch.tensor(kv, dtype=torch.int32, device=device)
    cu_k = torch.nn.functional.pad(torch.cumsum(kv_len, 0, dtype=torch.int32), (1, 0))
    if block_table is None:
        rows, cols = slot_kv_index(slot, kv_len, sum(kv))
    else:
        rows, cols = paged_kv_index(block_table, kv_len, sum(kv), page_size)
    if repeat_heads is None:
        repeat_heads = not (VARLEN is not None and VARLEN[2])
    heads = None
    if repeat_heads and kv_heads != num_heads:
        heads = torch.arange(num_heads, device=device) // (num_heads // kv_heads)
    return KVPlan(rows, cols, heads, cu_q, cu_k, max(qlen, default=0), max(kv, default=0))


def flash_prefill_attention(q, k, v, p: KVPlan, scale):
    """q [T, H, D] packed by document; k, v packed [sum_k, Hkv or H, D] (`gather_kv`). Causal,
    bottom-right: query i of document n sees its keys 0 .. k_len[n] - q_len[n] + i. Calls
    `VARLEN` (the CPU tests swap torch_varlen_attn in)."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    fn, causal, has_gqa = VARLEN
    gqa = {"enable_gqa": True} if has_gqa and k.shape[1] != q.shape[1] else {}
    return fn(q, k, v, p.cu_q, p.cu_k, p.max_q, p.max_k, scale=scale, **causal, **gqa)


def prefill_attention(q, keys, values, p: KVPlan, scale):
    """One layer: gather the cached K/V the plan names, then flash varlen. q: [T, H, D]."""
    k, v = gather_kv(keys, values, p.rows, p.cols, p.heads)
    return flash_prefill_attention(q, k, v, p, scale)
