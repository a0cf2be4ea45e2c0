"""How a call is cut into programs: work items (token ranges) and kernel tile sizes.

A program scans its token range sequentially, so the parallelism of one launch is
items x heads x value tiles. When documents are few and long (B*H small, or one long sequence)
that is too few programs to fill the GPU, so documents longer than `seg_len` are cut into
segments: each segment computes a local state, a cheap combine turns those into start states,
and the main pass runs all segments at once. Documents never share an item, so packed sequences
(cu_seqlens) run in the same single launch.

No host synchronisation: the plan is built from what the host knows (shapes; `cu_seqlens` only
when it is a CPU tensor; the optional `max_seqlen`). With offsets on the GPU and no
`max_seqlen`, the split rule assumes the longest document may be the whole sequence; documents
shorter than a segment stay one item, and the segment table is written on the device
(triton_items.py) for an upper bound of items.

Tuned numbers come from triton_tune.py (per GPU model); `override(...)` lets benchmarks and tests
force any of them."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import triton

from .triton_tune import Tiles, Tuning, tuning

_OVERRIDES: dict = {}


@contextlib.contextmanager
def override(**kwargs):
    """Temporarily force plan/config fields. Plan: block_t, seg_len, min_seg, target_programs,
    split_threshold, programs_per_sm, fused_programs_per_sm, lpt, device_plan (treat cu_seqlens as
    device data even on the CPU), prec, fused (True/False: the fused dk+dv pass or the separate
    ones). Tiles: block_v, num_warps, num_stages, tma, for every pass or one (fwd_*, state_*, dq_*,
    rev_*, fused_*)."""
    old = dict(_OVERRIDES)
    _OVERRIDES.update(kwargs)
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(old)


@dataclass
class Plan:
    mode: int                        # 0: rows of a batch; 1: documents of cu; 2: segment table
    n_items: int                     # items along the grid (an upper bound for a device table)
    n_docs: int
    segmented: bool                  # documents may span several items
    seq_len: int = 0                 # mode 0: tokens per row
    cu: torch.Tensor | None = None   # mode 1: the offsets
    order: torch.Tensor | None = None        # mode 1: documents longest first
    items: torch.Tensor | None = None        # mode 2: int32 [n_items, 4] (start, end, doc, flags)
    doc_first: torch.Tensor | None = None    # mode 2: int32 [n_docs + 1]


@dataclass(frozen=True)
class TileConfig:
    block_t: int
    block_k: int
    block_v: int
    num_warps: int
    num_stages: int
    tma: bool


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _tuned(device: torch.device) -> Tuning:
    return tuning(device)


def setting(name: str, device: torch.device):
    """A plan-level tuning field, or its override."""
    if name in _OVERRIDES:
        return _OVERRIDES[name]
    return getattr(_tuned(device), name)


def fused_enabled(device: torch.device, dk: int, dv: int) -> bool:
    want = _OVERRIDES.get("fused")
    if want is None:
        want = _tuned(device).fused is not None
    # all of R (DK x DV fp32) lives in one program's registers
    return bool(want) and max(dk, dv) <= 128


def block_t_for(block_size: int | None, kind: str, device: torch.device) -> int:
    """The kernels' block length: the user's hint rounded to a power of two in [16, 128]
    (tl.dot needs >= 16; larger blocks spill registers), else the tuned one. Results do not
    depend on it."""
    for key in (f"{kind}_block_t", "block_t"):
        if key in _OVERRIDES:
            return _OVERRIDES[key]
    if block_size is not None:
        return min(128, max(16, triton.next_power_of_2(block_size)))
    return _tiles(kind, device).block_t


def _tiles(kind: str, device: torch.device) -> Tiles:
    t = _tuned(device)
    if kind == "fused":
        return t.fused or Tiles(block_t=64, block_v=128, num_warps=8, num_stages=2)
    return getattr(t, kind)


def _get(name: str, kind: str, tiles: Tiles):
    for key in (f"{kind}_{name}", name):
        if key in _OVERRIDES:
            return _OVERRIDES[key]
    return getattr(tiles, name)


_SMEM_BUDGET = 180 * 1024


def tile_config(kind: str, dk: int, dv: int, elem_bytes: int, device: torch.device,
                block_size: int | None = None) -> TileConfig:
    """Tiles for one pass with key dim dk and value dim dv. kind: "fwd" (forward scan), "state"
    (local-state passes), "dq", "rev" (separate dv / dk scans) or "fused" (dk+dv; all of dv)."""
    tiles = _tiles(kind, device)
    block_t = block_t_for(block_size, kind, device)
    block_k = max(16, triton.next_power_of_2(dk))
    full_v = max(16, triton.next_power_of_2(dv))
    if kind == "fused":
        block_v = full_v
    else:  # tiles are tuned at D = 128: wider keys keep the state tile's area (registers)
        want = _get("block_v", kind, tiles)
        block_v = min(max(16, want), full_v, max(16, 128 * want // block_k))
    num_warps = _get("num_warps", kind, tiles)
    num_stages = _get("num_stages", kind, tiles)
    # shared memory per pipeline stage: the tiles one block loads
    if kind == "fused":
        stage = block_t * (2 * block_k + 2 * block_v) * elem_bytes
    elif kind == "state":
        stage = block_t * (block_k + block_v) * elem_bytes
    else:
        stage = block_t * (2 * block_k + block_v) * elem_bytes
    while num_stages > 1 and num_stages * stage > _SMEM_BUDGET:
        num_stages -= 1
    tma = bool(_get("tma", kind, tiles)) and dk == block_k and dv % block_v == 0
    return TileConfig(block_t, block_k, block_v, num_warps, num_stages, tma)


# ---- work items ------------------------------------------------------------------------------

def _seg_len(total: int, longest: int, per_item: int, device: torch.device, fused: bool) -> int:
    """Segment length (a multiple of 128 tokens, so blocks stay whole), or >= longest for no
    split.

    A program's time grows with its range length; a launch ends with its longest program.
    Unsplit, that is the longest document; a balanced launch needs `work / sms` per SM. Splitting
    costs an extra pass over two inputs, so split only when the longest document is over
    `split_threshold` x the balanced share; then aim for `programs_per_sm` programs per SM."""
    seg = _OVERRIDES.get("seg_len")
    if seg is not None:
        return max(1, seg)  # forced (tests): any length works, aligned or not
    sms = _num_sms(device)
    work = total * per_item
    target = _OVERRIDES.get("target_programs")
    if target is None:
        pps = setting("fused_programs_per_sm" if fused else "programs_per_sm", device)
        target = max(1, int(pps * sms))
        if total == 0 or longest * sms <= setting("split_threshold", device) * work:
            return max(longest, 1)
    seg = max(-(-work // target), 8 * 64, setting("min_seg", device))
    return -(-seg // 128) * 128


def _pinned(rows, device: torch.device) -> torch.Tensor:
    t = torch.tensor(rows, dtype=torch.int32)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)  # no stream sync
    return t


@functools.lru_cache(maxsize=64)
def _host_table(offsets: tuple, seg_len: int, lpt: bool, device: torch.device):
    """Segment table of host offsets: items of a document are contiguous (the combine walks
    them); documents run longest first when `lpt` and no document is split."""
    docs = list(range(len(offsets) - 1))
    lens = [offsets[d + 1] - offsets[d] for d in docs]
    if lpt and max(lens, default=0) <= seg_len:
        docs.sort(key=lambda d: -lens[d])
    items, first = [], [0] * (len(docs) + 1)
    for d in docs:
        a, b = offsets[d], offsets[d + 1]
        segs = [(s, min(s + seg_len, b)) for s in range(a, b, seg_len)] or [(a, a)]
        for i, (s, e) in enumerate(segs):
            items.append((s, e, d, 4 | (i == 0) | (2 * (i == len(segs) - 1))))
    pos = 0
    for d in range(len(docs)):  # doc_first in document order (only used when items are in order)
        first[d] = pos
        pos += max(1, -(-lens[d] // seg_len))
    first[len(docs)] = pos
    return _pinned(items, device).reshape(-1, 4), _pinned(first, device), len(items)


def make_plan(device: torch.device, *, batch: int, seq: int, heads: int, n_value_tiles: int,
              cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
              fused: bool = False) -> Plan:
    """Work items for a [batch, seq] call, or for the packed documents of `cu_seqlens`.

    Host offsets (cu_seqlens on the CPU) give the exact split rule; device offsets use
    `max_seqlen` when given, else assume one document may span the whole sequence."""
    per_item = heads * n_value_tiles
    if cu_seqlens is None:
        total = batch * seq
        seg = _seg_len(total, seq, per_item, device, fused)
        if seg >= seq:
            return Plan(0, batch, batch, False, seq_len=seq)
        offsets = tuple(range(0, total + 1, seq)) if seq > 0 else (0,) * (batch + 1)
        items, first, n = _host_table(offsets, seg, False, device)
        return Plan(2, n, batch, True, items=items, doc_first=first)
    n_docs = cu_seqlens.numel() - 1
    total = seq
    host = cu_seqlens.device.type == "cpu" and not _OVERRIDES.get("device_plan")
    lpt = bool(setting("lpt", device))
    if host:
        offsets = tuple(int(x) for x in cu_seqlens.tolist())
        longest = max((b - a for a, b in zip(offsets[:-1], offsets[1:])), default=0)
        seg = _seg_len(total, longest, per_item, device, fused)
        items, first, n = _host_table(offsets, seg, lpt, device)
        return Plan(2, n, n_docs, seg < longest, items=items, doc_first=first)
    cu = cu_seqlens.to(device, non_blocking=True)
    longest = total if max_seqlen is None else min(max_seqlen, total)
    seg = _seg_len(total, longest, per_item, device, fused)
    if seg >= longest:
        order = None
        if lpt and n_docs > 1:
            order = torch.argsort(cu[1:] - cu[:-1], descending=True).to(torch.int32)
        return Plan(1, n_docs, n_docs, False, cu=cu, order=order)
    from .triton_items import items_kernel

    bound = n_docs + total // seg
    items = torch.empty(bound, 4, dtype=torch.int32, device=device)
    first = torch.empty(n_docs + 1, dtype=torch.int32, device=device)
    items_kernel.at(device)[(1,)](cu, items, first, n_docs, bound, total, seg, BLOCK=256)
    return Plan(2, bound, n_docs, True, items=items, doc_first=first)
