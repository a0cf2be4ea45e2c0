"""How a call is cut into programs: work items (token ranges) and kernel tile sizes.

A program scans its token range sequentially, so the parallelism of one launch is
items x heads x value tiles. When documents are few and long (B*H small, or one long sequence)
that is too few programs to fill the GPU, so documents longer than `seg_len` are cut into
segments: each segment computes a local state, a cheap combine turns those into start states,
and the main pass runs all segments at once (`make_plan` says when that pays). Documents
never share an item, so packed sequences (cu_seqlens) run in the same single launch.

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
    """Temporarily force plan/config fields: block_t, seg_len, min_seg, target_programs, prec,
    and the tile fields block_v, num_warps, num_stages (optionally per kind: fwd_*, bwd_*)."""
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
    doc_first: torch.Tensor   # int32 [n_docs + 1]: doc d owns items [doc_first[d], doc_first[d+1])
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


@functools.lru_cache(maxsize=8)
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


def _get(name: str, kind: str):
    return _OVERRIDES.get(f"{kind}_{name}", _OVERRIDES.get(name))


def tile_config(dk: int, dv: int, kind: str = "fwd", elem_bytes: int = 2,
                block_t: int = 64) -> TileConfig:
    """Tiles for one scan pass with key dim dk and value dim dv. `kind` is "fwd" (the forward
    and its state pass) or "bwd" (dq, dk, dv and the reverse state pass); overrides may be
    given per kind ("bwd_block_v") or for both ("block_v").

    Measured on H100 (bf16, D=E=128, docs/kernels.md): a 128 x 32 fp32 state tile with 4 warps
    and a 3-deep load pipeline runs two programs per SM and beats wider tiles, which hold one
    program per SM and leave the tensor cores waiting on the serial state chain."""
    block_k = max(16, triton.next_power_of_2(dk))
    full_v = max(16, triton.next_power_of_2(dv))
    block_v = min(_get("block_v", kind) or max(16, min(full_v, 4096 // block_k)), full_v)
    num_warps = _get("num_warps", kind) or (4 if block_k * block_v <= 8192 else 8)
    num_stages = _get("num_stages", kind)
    if num_stages is None:
        # shared memory per pipeline stage: the a, b and v tiles of one block
        stage = block_t * (2 * block_k + block_v) * elem_bytes
        num_stages = 3 if 3 * stage <= 160 * 1024 else (2 if 2 * stage <= 200 * 1024 else 1)
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
        # A program's time grows with its range length; a launch ends with its longest program.
        # Unsplit, that is the longest document; a balanced launch needs `work / sms` per SM.
        # Splitting costs an extra pass over k and v (about +50% memory traffic), so split only
        # when the longest document is over twice the balanced share; then aim for about
        # `target_programs` programs: two per SM, what stays resident at once (a second wave
        # leaves a tail; measured on H100).
        sms = _num_sms(device)
        per_item = heads * n_value_tiles
        work = total * per_item
        longest = max((b - a for a, b in zip(offsets[:-1], offsets[1:])), default=0)
        target = _OVERRIDES.get("target_programs") or 2 * sms
        if total == 0 or ("target_programs" not in _OVERRIDES and longest * sms <= 2 * work):
            seg_len = max(total, 1)
        else:
            seg_len = max(-(-work // target), 8 * block_t, _OVERRIDES.get("min_seg", 1024))
    seg_len = -(-seg_len // block_t) * block_t
    items, first, n_items, n_docs, segmented = _items_cached(tuple(offsets), seg_len, device)
    return Plan(items, first, n_items, n_docs, segmented, block_t)
