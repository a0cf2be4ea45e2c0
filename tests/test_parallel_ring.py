"""Ring attention (softmax layers under context parallelism) == single-device causal document
attention: outputs and gradients, GQA, documents crossing rank boundaries, zigzag balance."""

from __future__ import annotations

import pytest
import torch

from minimax01.ops.attention import causal_attention
from minimax01.parallel.block_attention import CpuFlashKernel, MathKernel
from minimax01.parallel.context import CPContext
from minimax01.parallel.ring_attention import _merge, ring_plan
from parallel_checks import check_ring

from dist_utils import run_workers

H, HKV, D = 4, 2, 8
SCALE = D ** -0.5


def _inputs(t, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, t, H, D, generator=g, dtype=dtype)
    k = torch.randn(1, t, HKV, D, generator=g, dtype=dtype)
    v = torch.randn(1, t, HKV, D, generator=g, dtype=dtype)
    return q, k, v


def _reference(q, k, v, starts):
    cu = torch.tensor(sorted(set(starts) | {0}) + [q.shape[1]], dtype=torch.int32)
    return causal_attention(q, k, v, cu_seqlens=cu, scale=SCALE)


def _zigzag_order(size, t):
    chunk = t // (2 * size)
    return [torch.arange(c * chunk, (c + 1) * chunk) for r in range(size)
            for c in (r, 2 * size - 1 - r)]


LAYOUTS = [[0], [0, 3, 11, 12, 21], [0, 8, 16, 24], [0, 1, 30]]


@pytest.mark.parametrize("size", [2, 3, 4])
@pytest.mark.parametrize("balanced", [False, True])
@pytest.mark.parametrize("starts", LAYOUTS)
def test_ring_plan_simulated(size, balanced, starts):
    """Every rank's pieces, computed with the math kernel and merged by log-sum-exp, give the
    full causal document attention."""
    t = 8 * size
    starts = [s for s in starts if s < t]
    q, k, v = _inputs(t)
    ref = _reference(q, k, v, starts)
    rep = H // HKV
    kk, vv = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    n = t // size
    kernel = MathKernel()
    for r in range(size):
        ctx = CPContext.from_starts(starts, r, size, n)
        if balanced:
            order = _zigzag_order(size, t)
            idx = lambda j: torch.cat(order[2 * j:2 * j + 2])  # noqa: E731
        else:
            idx = lambda j: torch.arange(j * n, (j + 1) * n)  # noqa: E731
        mine = idx(r)
        o = torch.zeros(1, n, H, D, dtype=torch.float64)
        lse = torch.full((1, H, n), float("-inf"), dtype=torch.float64)
        for s, items in enumerate(ring_plan(ctx, balanced)):
            src = idx((r - s) % size)
            for qa, qb, ka, kb, segs in items:
                ob, lb = kernel.forward(q[:, mine[qa:qb]], kk[:, src[ka:kb]], vv[:, src[ka:kb]],
                                        SCALE, segs)
                _merge(o, lse, qa, qb, ob, lb)
        torch.testing.assert_close(o, ref[:, mine], rtol=1e-10, atol=1e-10)


def _worker(rank, size, cases):
    for starts, kernel, mode, dtype in cases:
        tol = 1e-9 if dtype == torch.float64 else 2e-5
        check_ring(starts, kernel=kernel, mode=mode, dtype=dtype, tol=tol, seed=len(starts))
    if size == 2:  # unpacked rows (batch 3, one document per row)
        check_ring([0], rows=3, mode="balanced", tol=1e-9)
        check_ring([0], rows=3, mode="allgather", tol=1e-9)


CASES = [([0, 3, 11, 12], "math", "balanced", torch.float64),
         ([0, 8], "math", "contiguous", torch.float64),
         ([0, 5], "cpu_flash", "balanced", torch.float32),
         ([0, 2, 9, 13], "cpu_flash", "contiguous", torch.float32),
         ([0, 6, 7], "math", "allgather", torch.float64)]


def test_ring_two_processes():
    run_workers(_worker, 2, CASES)


def test_ring_four_processes():
    run_workers(_worker, 4, [([0, 3, 11, 12, 21, 22], "math", "balanced", torch.float64),
                             ([0, 1, 30], "math", "contiguous", torch.float64)])


def test_cpu_flash_kernel_matches_math():
    q, k, v = _inputs(12, dtype=torch.float32)
    k, v = k.repeat_interleave(2, 2), v.repeat_interleave(2, 2)
    for segs in (None, [(0, 5), (5, 12)]):
        o1, l1 = MathKernel().forward(q, k, v, SCALE, segs)
        o2, l2 = CpuFlashKernel().forward(q, k, v, SCALE, segs)
        torch.testing.assert_close(o2.float(), o1.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(l2, l1.float(), rtol=1e-5, atol=1e-5)
        do = torch.randn_like(q)
        g1 = MathKernel().backward(do, q, k, v, o1, l1, SCALE, segs)
        g2 = CpuFlashKernel().backward(do, q, k, v, o1, l1, SCALE, segs)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(b.float(), a.float(), rtol=1e-4, atol=1e-5)
