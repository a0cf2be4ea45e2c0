"""The lightning output RMSNorm under tensor parallelism (SPEC §3 step 4).

The norm runs over all H*d features of a token, but a rank holds only its heads' H/N*d of them.
mean(x^2) over the full width is (sum over ranks of each rank's sum of squares) / (H*d): one
all-reduce of one fp32 number per token, then every rank normalises its own features with the
shared statistic and scales them by its slice of the norm weight. Same arithmetic as
ops.norm.rms_norm (fp32, fp64 stays fp64; cast back before the weight), so it equals the
single-device norm up to the order of the fp32 sums."""

from __future__ import annotations

import torch
import torch.distributed as dist


def tp_rms_norm(x_local: torch.Tensor, weight_local: torch.Tensor, eps: float, full_width: int,
                group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """x_local [..., w] (this rank's features of each token), weight_local [w] (the same slice of
    the norm weight), `full_width` the norm's whole width. Collective over `group` (every rank
    calls it); without an initialised process group it is the single-device norm."""
    xf = x_local if x_local.dtype == torch.float64 else x_local.float()
    sumsq = xf.pow(2).sum(-1, keepdim=True)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(sumsq, op=dist.ReduceOp.SUM, group=group)
    y = xf * torch.rsqrt(sumsq / full_width + eps)
    return weight_local * y.to(x_local.dtype)
