"""LASP+ (lightning attention under context parallelism) == the single-device op, outputs and
gradients, with packed documents crossing rank boundaries."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from minimax01.ops import lightning_attn
from minimax01.parallel.context import CPContext
from minimax01.parallel.lasp import incoming_state, lasp_lightning_attn, lasp_plan, slice_state
from parallel_checks import check_lasp

from dist_utils import run_workers

H, D = 3, 4


def _inputs(t, seed=0, b=1):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, t, H, D, generator=g, dtype=torch.float64) * 0.5 for _ in range(3))
    slope = torch.tensor([0.05, 0.3, 1.0], dtype=torch.float64)
    return q, k, v, slope


def _local_cu(starts, lo, hi):
    cuts = [0] + [s - lo for s in starts if lo < s < hi] + [hi - lo]
    return torch.tensor(cuts, dtype=torch.int32)


def _reference(q, k, v, slope, starts):
    t = q.shape[1]
    cu = torch.tensor(sorted(set(starts) | {0}) + [t], dtype=torch.int32)
    o, _ = lightning_attn(q, k, v, slope, cu_seqlens=cu, backend="naive")
    return o


LAYOUTS = [
    [0],                    # one document over every rank
    [0, 5, 13, 14],         # documents crossing boundaries, one ending at a boundary
    [0, 8, 16],             # boundaries exactly at slice starts (C=4, T_l=4 / C=2, T_l=8)
    [0, 1, 15],             # a document running through whole middle slices
]


@pytest.mark.parametrize("size", [2, 3, 4])
@pytest.mark.parametrize("starts", LAYOUTS)
def test_lasp_combination_simulated(size, starts):
    """All ranks simulated in one process: slice states, the incoming-state combination and the
    per-slice op reproduce the full sequence, forward and backward."""
    t = 4 * size if size != 3 else 18
    starts = [s for s in starts if s < t]
    q, k, v, slope = _inputs(t)
    ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = _reference(*ref_in, slope, starts)
    grad = torch.randn_like(ref)
    (ref * grad).sum().backward()

    n = t // size
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ctxs = [CPContext.from_starts(starts, r, size, n) for r in range(size)]
    plans = [lasp_plan(c) for c in ctxs]
    states = torch.stack([slice_state(leaves[1][:, r * n:(r + 1) * n], leaves[2][:, r * n:(r + 1) * n],
                                      slope, plans[r][2]) for r in range(size)])
    outs = []
    for r in range(size):
        cont, through, _ = plans[r]
        init = incoming_state(states, slope, cont, through, r, n)
        cu = _local_cu(starts, r * n, (r + 1) * n)
        if init is not None and cu.numel() > 2:
            init = torch.cat([init, init.new_zeros((cu.numel() - 2,) + init.shape[1:])])
        sl = slice(r * n, (r + 1) * n)
        o, _ = lightning_attn(leaves[0][:, sl], leaves[1][:, sl], leaves[2][:, sl], slope,
                              initial_state=init, cu_seqlens=cu, backend="chunk", block_size=3)
        outs.append(o)
    out = torch.cat(outs, 1)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    (out * grad).sum().backward()
    for a, b in zip(leaves, ref_in):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10)


def _worker(rank, size, layouts, batch):
    group = dist.group.WORLD
    for starts in layouts:
        t = 8 * size
        q, k, v, slope = _inputs(t, seed=len(starts), b=batch)
        if batch > 1:
            starts = [0]
        ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
        if batch > 1:
            ref, _ = lightning_attn(*ref_in, slope, backend="naive")
        else:
            ref = _reference(*ref_in, slope, starts)
        grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7), dtype=ref.dtype)
        (ref * grad).sum().backward()
        n = t // size
        sl = slice(rank * n, (rank + 1) * n)
        positions = torch.arange(t) - torch.tensor([max(s for s in starts if s <= i) for i in range(t)])
        ctx = CPContext.gather(group, rank, size, positions[sl].expand(batch, n))
        assert ctx.starts == sorted(set(starts))
        local = [x[:, sl].clone().requires_grad_() for x in (q, k, v)]
        cu = _local_cu(starts, rank * n, (rank + 1) * n) if batch == 1 else None
        o, _ = lasp_lightning_attn(*local, slope, cu_seqlens=cu, ctx=ctx)
        torch.testing.assert_close(o, ref[:, sl], rtol=1e-10, atol=1e-10)
        (o * grad[:, sl]).sum().backward()
        for a, b in zip(local, ref_in):
            torch.testing.assert_close(a.grad, b.grad[:, sl], rtol=1e-9, atol=1e-10)


def _selfcheck_worker(rank, size, layouts):
    for starts in layouts:
        check_lasp(starts, tol=1e-9)
    _worker(rank, size, [[0]], 3)  # unpacked rows, one document each


def test_lasp_two_processes():
    run_workers(_selfcheck_worker, 2, [[0], [0, 5, 13], [0, 8], [0, 3, 8, 9, 15]])


def test_lasp_four_processes():
    run_workers(_selfcheck_worker, 4, [[0, 1, 30], [0, 8, 16, 24, 25]])
