"""Every load and store of the Triton lightning kernels stays inside its tensors, for every
schedule and for hostile device offsets and slots (CPU: Triton's interpreter under the bounds
checker of tests/lightning_bounds.py; what is an illegal memory access on the GPU fails here)."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from lightning_bounds import bounds_checked  # noqa: E402

from minimax01.ops.lightning import triton_plan  # noqa: E402
from minimax01.ops.lightning.triton_ops import triton_lightning_attn  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter (CPU) only")


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


LENS = [5, 0, 1, 33, 70, 3]


def _inputs(lens=LENS, b=1, h=2, d=16, e=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lens) if lens else 37
    q, k = (torch.randn(b, t, h, d, generator=g) * 0.5 for _ in range(2))
    v = torch.randn(b, t, h, e, generator=g)
    return q, k, v, torch.tensor([0.05, 0.7])


def _run(q, k, v, slope, cu, **ov):
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    n = q.shape[0] if cu is None else cu.numel() - 1
    g = torch.Generator().manual_seed(7)
    s0 = torch.randn(n, q.shape[2], q.shape[3], v.shape[3], generator=g).requires_grad_()
    with triton_plan.override(**ov):
        o, f = triton_lightning_attn(*xs, slope, initial_state=s0, cu_seqlens=cu,
                                     output_final_state=True)
        (o.sum() + (f * f).sum()).backward()
    return o.detach(), f.detach(), [x.grad for x in xs] + [s0.grad]


SCHEDULES = [
    dict(),                                              # documents as items (mode 1)
    dict(seg_len=16),                                    # host segment table + combine
    dict(device_plan=True, seg_len=16),                  # device-built segment table
    dict(device_plan=True, lpt=True),                    # longest first (device argsort)
    dict(device_plan=True, seg_len=9, fused=True, tma=True),
    dict(tma=True, block_v=16, fwd_block_t=32, rev_block_t=16, seg_len=24),
]


@pytest.mark.parametrize("ov", SCHEDULES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
                         or "default")
def test_packed_schedules_in_bounds(ov):
    q, k, v, slope = _inputs()
    cu = torch.tensor([0] + torch.tensor(LENS).cumsum(0).tolist(), dtype=torch.int32)
    with bounds_checked() as st:
        _run(q, k, v, slope, cu, **ov)
    assert st["accesses"] > 100


@pytest.mark.parametrize("ov", [dict(), dict(seg_len=16, tma=True), dict(seg_len=10, fused=True)])
def test_batch_rows_in_bounds(ov):
    q, k, v, slope = _inputs(lens=None, b=3)
    with bounds_checked() as st:
        _run(q, k, v, slope, None, **ov)
    assert st["accesses"] > 100


@pytest.mark.parametrize("cu", [[0, 40, 5, 40], [0, 40, 0, 40, 0, 40], [35, 3, 40], [0, 30, 999]])
@pytest.mark.parametrize("ov", [dict(seg_len=16), dict(seg_len=8, fused=True), dict()])
def test_hostile_device_offsets_in_bounds(cu, ov):
    """Device offsets out of order or overlapping: the host cannot read them, so the kernels
    must stay in bounds whatever they say (the segment table used to be written past its end
    when overlapping documents made more items than its bound). The values are then garbage by
    contract: rows no document covers are never written (the output is uninitialised there), so
    only the accesses are checked, and the shape."""
    q, k, v, slope = _inputs(lens=[20, 20])
    cu = torch.tensor(cu, dtype=torch.int32)
    with bounds_checked() as st:
        o, _, _ = _run(q, k, v, slope, cu, device_plan=True, **ov)
    assert st["accesses"] > 10 and o.shape == q.shape[:-1] + v.shape[-1:]


def test_device_offsets_in_order_still_exact():
    """The bound masks never cut a table of valid offsets: a device table gives what the
    unsplit documents give (outputs, final states, all gradients)."""
    q, k, v, slope = _inputs()
    cu = torch.tensor([0] + torch.tensor(LENS).cumsum(0).tolist(), dtype=torch.int32)
    with bounds_checked():
        got = _run(q, k, v, slope, cu, device_plan=True, seg_len=8)
    ref = _run(q, k, v, slope, cu)
    for a, b in zip([got[0], got[1]] + got[2], [ref[0], ref[1]] + ref[2]):
        assert rel(a, b) < 1e-5


def test_decode_bad_slots_in_bounds():
    from minimax01.ops.lightning.triton_decode import triton_lightning_decode

    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(4, 2, 16, generator=g) for _ in range(2))
    v = torch.randn(4, 2, 32, generator=g)
    pool = torch.randn(5, 2, 16, 32, generator=g)
    slots = torch.tensor([2, -1, 5, 2 ** 33 + 1])
    with bounds_checked() as st:
        o = triton_lightning_decode(q, k, v, pool, torch.tensor([0.1, 0.2]), slot_idx=slots)
    assert st["accesses"] > 0 and torch.isnan(o[1:]).all() and torch.isfinite(o[0]).all()


def test_checker_catches_an_overrun():
    """The checker itself: a segment table one row too short for the item count it is told."""
    from minimax01.ops.lightning.triton_items import items_kernel

    cu = torch.tensor([0, 40, 80], dtype=torch.int32)
    items = torch.empty(5, 4, dtype=torch.int32)
    first = torch.empty(3, dtype=torch.int32)
    with pytest.raises(Exception, match="outside every tensor argument"):
        with bounds_checked():
            # n_items = 6 > the 5 rows there are: the fill loop writes row 5
            items_kernel.at(torch.device("cpu"))[(1,)](cu, items, first, 2, 6, 80, 40, BLOCK=16)
