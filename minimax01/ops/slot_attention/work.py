"""Launch planning for the slot-attention kernel (host side, no Triton): the program list and the
key-range splits of a decode launch."""

from __future__ import annotations

import math

import torch


def decode_splits(batch: int, kv_heads: int, max_context: int, sms: int = 132) -> int:
    """Key-range splits for a decode launch: enough programs for ~2 waves, none shorter than 256
    keys. Fixed per batch size so a captured CUDA graph stays valid at every length."""
    want = max(1, math.ceil(2 * sms / max(batch * kv_heads, 1)))
    return int(max(1, min(want, math.ceil(max_context / 256), 64)))


def work_list(qlen: list[int], block_m: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's program list from host lengths: (document, first query) of every block of
    `block_m` queries, int32 on `device`."""
    docs, firsts = [], []
    for n, length in enumerate(qlen):
        for q0 in range(0, length, block_m):
            docs.append(n)
            firsts.append(q0)
    return (torch.tensor(docs, dtype=torch.int32, device=device),
            torch.tensor(firsts, dtype=torch.int32, device=device))
