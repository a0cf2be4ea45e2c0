"""CUDA-graph decode: one captured decode step per padded batch size.

Multi-level padding (paper §3.3): a decode batch of n sequences runs the graph of the smallest
bucket >= n, the extra rows pointing at the pool's scratch slot. Graphs are captured lazily, on a
bucket's first use, and share one memory pool."""

from __future__ import annotations

import logging

import torch

from .h2d import to_device

log = logging.getLogger(__name__)


def decode_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, 16, then steps of 16 up to 64, of 32 up to 256, of 64 beyond."""
    out, b = [], 1
    while b < 16:
        out.append(b)
        b *= 2
    b = 16
    while b < max_batch:
        out.append(b)
        b += 16 if b < 64 else 32 if b < 256 else 64
    out.append(max_batch)
    return sorted(set(x for x in out if x <= max_batch))


class DecodeGraphs:
    def __init__(self, model, cache, max_batch: int):
        self.model, self.cache = model, cache
        dev = cache.pool.device
        self.buckets = decode_buckets(max_batch)
        self.input_ids = torch.zeros(max_batch, 1, dtype=torch.long, device=dev)
        self.slot_idx = torch.full((max_batch,), cache.pool.scratch, dtype=torch.long, device=dev)
        self.active = torch.zeros(max_batch, dtype=torch.bool, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.steps: dict[int, object] = {}
        self.mempool = torch.cuda.graph_pool_handle()

    def bucket(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"decode batch {n} exceeds the largest graph bucket {self.buckets[-1]}")

    def _capture(self, b: int) -> None:
        log.info("capturing the decode CUDA graph for batch %d", b)
        self.slot_idx[:b].fill_(self.cache.pool.scratch)
        self.active[:b].fill_(False)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compiles kernels, sets up library workspaces
            for _ in range(2):
                self.model(self.input_ids[:b],
                           cache=self.cache.begin_decode(self.slot_idx[:b], self.active[:b]))
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        step = self.cache.begin_decode(self.slot_idx[:b], self.active[:b])
        with torch.cuda.graph(graph, pool=self.mempool):
            logits = self.model(self.input_ids[:b], cache=step).logits[:, -1]
        # the step record's tensors (positions) live in the graph's pool: keep them with it
        self.graphs[b], self.logits[b], self.steps[b] = graph, logits, step

    def run(self, tokens: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """tokens [n] long on the device, slots: their cache slots. Returns logits [n, V]."""
        n = len(slots)
        b = self.bucket(n)
        if b not in self.graphs:
            self._capture(b)
        self.input_ids[:n, 0].copy_(tokens)
        self.input_ids[n:b].zero_()
        # one pinned non-blocking copy (infer/h2d.py): the slots, then the active flags
        ids = to_device(slots + [self.cache.pool.scratch] * (b - n) + [1] * n + [0] * (b - n),
                        self.slot_idx.device, torch.long)
        self.slot_idx[:b].copy_(ids[:b])
        self.active[:b].copy_(ids[b:].bool())
        self.graphs[b].replay()
        return self.logits[b][:n]
