"""One host-to-device copy per forward: the small integer tensors of an engine step (slots,
offsets, positions, token ids, the attention kernel's program list) packed into one int32
buffer.

`torch.tensor(list, device="cuda")` copies from pageable memory, which waits for the stream
(a cudaStreamSynchronize each); between two such copies the host cannot run ahead of the GPU,
so every launch after them is exposed. A pinned buffer copied with `non_blocking=True` never
waits, and the caching host allocator keeps a pinned block until the copy that reads it is done,
so a fresh buffer per step is safe. On the CPU it is a plain tensor."""

from __future__ import annotations

import torch


class StepTensors:
    """`parts` {name: list of ints}, concatenated and moved to `device` in one copy; `int32(name)`
    and `long(name)` are views (the long ones of one int64 copy of the buffer, made on the device
    at the first `long`). Values must fit in int32 (token ids, positions, slots do)."""

    def __init__(self, parts: dict[str, list[int]], device: torch.device):
        self.spans: dict[str, tuple[int, int]] = {}
        flat: list[int] = []
        for name, values in parts.items():
            self.spans[name] = (len(flat), len(flat) + len(values))
            flat += values
        self.buffer = to_device(flat, device)
        self._long = None

    def int32(self, name: str) -> torch.Tensor:
        a, b = self.spans[name]
        return self.buffer[a:b]

    def long(self, name: str) -> torch.Tensor:
        if self._long is None:
            self._long = self.buffer.long()
        a, b = self.spans[name]
        return self._long[a:b]


def to_device(values: list[int], device: torch.device, dtype: torch.dtype = torch.int32):
    """`values` as a `dtype` tensor on `device`: pinned + non-blocking on CUDA (no stream sync)."""
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
