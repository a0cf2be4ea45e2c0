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


def work_lists(qlen: list[int], block_m: int) -> tuple[list[int], list[int]]:
    """The kernel's program list as host lists: (document, first query) of every block of
    `block_m` queries (a caller that batches its host-to-device copies sends them itself)."""
    docs, firsts = [], []
    for n, length in enumerate(qlen):
        for q0 in range(0, length, block_m):
            docs.append(n)
            firsts.append(q0)
    return docs, firsts


def work_list(qlen: list[int], block_m: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`work_lists` as int32 tensors on `device`."""
    docs, firsts = work_lists(qlen, block_m)
    return (torch.tensor(docs, dtype=torch.int32, device=device),
            torch.tensor(firsts, dtype=torch.int32, device=device))
