"""The lightning output RMSNorm under tensor parallelism (parallel/tp_norm.py): on 2 and 4 gloo
processes, each holding its heads' features, the cross-rank sum-of-squares norm equals the
single-device norm over the full width (fp64 to 1e-12, fp32 to fp32 rounding, bf16 to one ulp)."""

import pytest
import torch

from dist_utils import run_workers
from minimax01.ops.norm import rms_norm
from minimax01.parallel.tp_norm import tp_rms_norm

EPS = 1e-6


def inputs(dtype, width=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    # heads with very different scales: a per-rank norm would be visibly wrong
    x = torch.randn(3, 5, width, generator=g, dtype=torch.float64)
    x *= torch.logspace(-2, 1, width, dtype=torch.float64)
    w = 1 + 0.1 * torch.randn(width, generator=g, dtype=torch.float64)
    return x.to(dtype), w.to(dtype)


def _check(rank, world):
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6), (torch.bfloat16, 2 ** -7)):
        x, w = inputs(dtype)
        width = x.shape[-1]
        part = width // world
        sl = slice(rank * part, (rank + 1) * part)
        got = tp_rms_norm(x[..., sl], w[sl], EPS, width)
        want = rms_norm(x, w, EPS)[..., sl]
        assert got.dtype == dtype
        err = ((got.double() - want.double()).abs() / want.double().abs().clamp_min(1e-3)).max()
        assert err <= tol, (dtype, err.item())
        wrong = rms_norm(x[..., sl], w[sl], EPS)  # what a rank-local norm would give
        assert (wrong.double() - want.double()).abs().max() > 0.1


@pytest.mark.parametrize("world", [2, 4])
def test_tp_rms_norm_equals_single_device(world):
    run_workers(_check, world)


def test_tp_rms_norm_without_a_group_is_the_norm():
    x, w = inputs(torch.float32)
    assert torch.equal(tp_rms_norm(x, w, EPS, x.shape[-1]), rms_norm(x, w, EPS))
