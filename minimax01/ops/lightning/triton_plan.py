"""How a call is cut into programs: work items (token ranges) and kernel tile sizes.

A program scans its token range sequentially, so the parallelism of one launch is
items x heads x value tiles. When documents are few and long (B*H small, or one long sequence)
that is too few programs to fill the GPU, so documents longer than `seg_len` are cut into
segments: each segment computes a local state, a cheap combine turns those into start states,
and the main pass runs all segments at once. `seg_len` is chosen so that the launch has about
`target_programs` programs; documents never share an item, so packed sequences (cu_seqlens)
run in the same single launch.

`override(...)` lets benchmarks and tests force tile sizes or segment lengths."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import triton

_OVERRIDES: dict = {}


@contextlib.contextmanager
def override(**kwargs):
    """Temporarily force plan/config fields: block_t, block_v, num_warps, num_stages, seg_len,
    target_programs, prec."""
    old = dict(_OVERRIDES)
    _OVERRIDES.update(kwargs)
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(old)


@dataclass
class Plan:
    items: torch.Tensor       # int32 [n_items, 2]: (start, end) offsets into the flattened tokens
    doc_first: torch.Tensor   # int32 [n_docs + 1]: items of document d are doc_first[d]:doc_first[d+1]
    n_items: int
    n_docs: int
    segmented: bool           # some document spans several items
    block_t: int


@dataclass(frozen=True)
class TileConfig:
    block_k: int
    block_v: int
    num_warps: int
    num_stages: int


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def block_t_for(block_size: int | None) -> int:
    """The kernels' block length: the user's hint rounded to a power of two in [16, 128]
    (tl.dot needs >= 16; larger blocks spill registers). Results do not depend on it."""
    if "block_t" in _OVERRIDES:
        return _OVERRIDES["block_t"]
    if block_size is None:
        return 64
    return min(128, max(16, triton.next_power_of_2(block_size)))


def tile_config(dk: int, dv: int, state_only: bool = False) -> TileConfig:
    """Tiles for one scan pass with key dim dk and value dim dv: the fp32 state tile
    block_k x block_v lives in registers, so keep it near 8K elements per 4 warps."""
    block_k = max(16, triton.next_power_of_2(dk))
    block_v = _OVERRIDES.get("block_v") or max(16, min(triton.next_power_of_2(dv), 8192 // block_k))
    block_v = min(block_v, max(16, triton.next_power_of_2(dv)))
    num_warps = _OVERRIDES.get("num_warps") or (4 if block_k * block_v <= 8192 else 8)
    num_stages = _OVERRIDES.get("num_stages") or 2
    return TileConfig(block_k, block_v, num_warps, num_stages)


@functools.lru_cache(maxsize=64)
def _items_cached(offsets: tuple, seg_len: int, device: torch.device):
    items, first = [], [0]
    for a, b in zip(offsets[:-1], offsets[1:]):
        if b - a <= seg_len:
            items.append((a, b))
        else:
            items.extend((s, min(s + seg_len, b)) for s in range(a, b, seg_len))
        first.append(len(items))
    segmented = any(first[i + 1] - first[i] > 1 for i in range(len(first) - 1))
    t_items = torch.tensor(items, dtype=torch.int32).reshape(-1, 2).to(device)
    t_first = torch.tensor(first, dtype=torch.int32).to(device)
    return t_items, t_first, len(items), len(first) - 1, segmented


def make_plan(offsets: list[int], heads: int, n_value_tiles: int, block_t: int,
              device: torch.device) -> Plan:
    """Work items for documents given by `offsets` ([0, n1, n1+n2, ..., total])."""
    total = offsets[-1]
    n_docs = len(offsets) - 1
    seg_len = _OVERRIDES.get("seg_len")
    if seg_len is None:
        target = _OVERRIDES.get("target_programs") or 2 * _num_sms(device)
        per_item = heads * n_value_tiles
        if n_docs * per_item >= target or total == 0:
            seg_len = max(total, 1)
        else:
            want_items = -(-target // per_item)
            seg_len = max(-(-total // want_items), 1)
            # segments shorter than ~8 blocks spend more on state traffic than they gain
            seg_len = max(seg_len, 8 * block_t, _OVERRIDES.get("min_seg", 1024))
    seg_len = -(-seg_len // block_t) * block_t
    items, first, n_items, n_docs, segmented = _items_cached(tuple(offsets), seg_len, device)
    return Plan(items, first, n_items, n_docs, segmented, block_t)
