"""The plain-PyTorch twin of the 8-bit grouped matmul: the reference every backend
(grouped.py) and every tuning candidate (triton_w8.py) is checked against."""

from __future__ import annotations

import torch


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def grouped_mm_q_torch(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                       counts: torch.Tensor) -> torch.Tensor:
    """The reference: rows of group e times q[e]^T, in fp32 (fp64 stays fp64), times scale[e];
    cast to x.dtype."""
    acc = _acc_dtype(x)
    outs = []
    for e, xe in enumerate(torch.split(x, [int(c) for c in counts.tolist()])):
        if xe.shape[0]:
            outs.append(((xe.to(acc) @ q[e].to(acc).t()) * scale[e].to(acc)).to(x.dtype))
    return torch.cat(outs, 0) if outs else x.new_zeros(0, q.shape[-2])
