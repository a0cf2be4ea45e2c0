"""Schedules of the Triton lightning kernels: every tuning choice computes the same function.

Tiles, pipeline depth, TMA loads, the fused dk+dv pass, split sequences, device-built segment
tables, longest-first document order and the per-GPU table are schedules of one arithmetic: each
is checked against the float64 reference (outputs, final states, all gradients including the
initial state's) and against the others. CPU: Triton's interpreter, small shapes."""

import json
import os

import pytest
import torch

from minimax01.ops import lightning_attn
from minimax01.ops.lightning import triton_plan, triton_tune
from minimax01.ops.lightning.triton_tune import Tiles, Tuning

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _interpret_on_cpu():
    if CUDA:
        yield
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


LENS = [5, 0, 1, 17, 40, 3, 0, 33, 70]


def problem(lens=LENS, h=2, d=16, e=32, seed=0, packed=True):
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    q = torch.randn(1, t, h, d, generator=g) * 0.5
    k = torch.randn(1, t, h, d, generator=g) * 0.5
    v = torch.randn(1, t, h, e, generator=g)
    slope = torch.logspace(-3, 0.3, h).float()
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    s0 = torch.randn(len(lens), h, d, e, generator=g)
    return q, k, v, slope, cu, s0


def run(backend, q, k, v, slope, cu, s0, block=None, **ov):
    """o, final state and the gradients of q, k, v, s0 through a loss on both."""
    cast = (lambda x: x.double()) if backend != "triton" else (lambda x: x.to(DEV))
    xs = [cast(x).clone().requires_grad_() for x in (q, k, v)]
    st = cast(s0).clone().requires_grad_()
    with triton_plan.override(**ov):
        o, f = lightning_attn(*xs, slope.to(xs[0].device), initial_state=st,
                              output_final_state=True, backend=backend, block_size=block,
                              cu_seqlens=None if cu is None else cu.to(xs[0].device))
        g = torch.Generator().manual_seed(1)
        loss = ((o.double().cpu() * torch.randn(o.shape, generator=g, dtype=F64)).sum()
                + (f.double().cpu() * torch.randn(f.shape, generator=g, dtype=F64)).sum())
        grads = torch.autograd.grad(loss, xs + [st])
    return [o, f] + list(grads)


SCHEDULES = [
    dict(seg_len=16),
    dict(fused=True),
    dict(fused=True, seg_len=7),
    dict(tma=True, seg_len=16),
    dict(tma=True, fused=True),
    dict(device_plan=True),
    dict(device_plan=True, seg_len=16),
    dict(device_plan=True, seg_len=9, fused=True, tma=True),
    dict(device_plan=True, lpt=True),
    dict(lpt=True),
    dict(block_v=16, fwd_block_t=32, rev_block_t=16, dq_block_t=64, seg_len=24),
]


@pytest.mark.parametrize("ov", SCHEDULES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_schedules_match_reference(ov):
    prob = problem()
    ref = run("naive", *prob)
    got = run("triton", *prob, **ov)
    for name, a, b in zip(("o", "S", "dq", "dk", "dv", "ds0"), got, ref):
        assert rel(a, b) < 1e-4, (name, rel(a, b))


def test_two_schedules_agree_beyond_rounding():
    """The same call under two very different schedules: equal to fp32 rounding."""
    prob = problem(seed=3)
    a = run("triton", *prob, block=16)
    b = run("triton", *prob, fused=True, tma=True, device_plan=True, seg_len=11, lpt=True)
    for x, y in zip(a, b):
        assert rel(x, y) < 2e-6


def test_batch_rows_split_and_unsplit():
    # [B, T] rows (no cu_seqlens): unsplit rows, and rows cut into segments
    g = torch.Generator().manual_seed(5)
    q, k = (torch.randn(3, 37, 2, 16, generator=g) * 0.5 for _ in range(2))
    v = torch.randn(3, 37, 2, 16, generator=g)
    s0 = torch.randn(3, 2, 16, 16, generator=g)
    slope = torch.tensor([0.05, 0.9])
    ref = run("naive", q, k, v, slope, None, s0)
    for ov in (dict(), dict(seg_len=16), dict(seg_len=10, fused=True)):
        got = run("triton", q, k, v, slope, None, s0, **ov)
        for a, b in zip(got, ref):
            assert rel(a, b) < 1e-4, ov


def test_device_table_equals_host_table():
    """The items kernel writes the same segments as the host planner, then empty items."""
    _, _, _, _, cu, _ = problem()
    seg = 16
    host = triton_plan._host_table(tuple(cu.tolist()), seg, False, torch.device("cpu"))[0]
    with triton_plan.override(device_plan=True, seg_len=seg):
        plan = triton_plan.make_plan(torch.device(DEV), batch=1, seq=int(cu[-1]), heads=2,
                                     n_value_tiles=1, cu_seqlens=cu.to(DEV))
    dev = plan.items.cpu()
    n = host.shape[0]
    assert plan.mode == 2 and dev.shape[0] >= n
    assert torch.equal(dev[:n], host)
    assert (dev[n:, :2] == 0).all() and (dev[n:, 2] == len(LENS)).all() and (dev[n:, 3] == 0).all()
    first = plan.doc_first.cpu().tolist()
    assert first[-1] == n and all(host[first[d], 2] == d for d in range(len(LENS)))


def test_bad_device_offsets_stay_in_bounds():
    """Offsets the host never reads (device data) are clamped in the kernels: no crash, and
    the tokens past the end of a too-long cu_seqlens are never touched."""
    q, k, v, slope, _, _ = problem(lens=[20, 20])
    cu = torch.tensor([0, 30, 999], dtype=torch.int32)  # the last offset is past T = 40
    from minimax01.ops.lightning.triton_ops import triton_lightning_attn

    # (lightning_attn would refuse these offsets here: on the CPU they are host data)
    with triton_plan.override(device_plan=True, seg_len=16):
        o, _ = triton_lightning_attn(q.to(DEV), k.to(DEV), v.to(DEV), slope.to(DEV),
                                     cu_seqlens=cu.to(DEV))
    ref, _ = lightning_attn(q.double(), k.double(), v.double(), slope,
                            cu_seqlens=torch.tensor([0, 30, 40]), backend="naive")
    assert rel(o, ref) < 1e-4  # clamped to [0, T]: the same documents as [0, 30, 40]


def test_tile_config_caps_and_stages():
    dev = torch.device("cpu")
    with triton_plan.override(block_v=64, num_stages=4):
        cfg = triton_plan.tile_config("fwd", 128, 128, 4, dev)   # fp32: 4 deep would not fit
        assert cfg.block_v == 64 and cfg.num_stages < 4
        assert triton_plan.tile_config("fwd", 16, 16, 2, dev).block_v == 16  # capped at E
        assert triton_plan.tile_config("fused", 64, 128, 2, dev).block_v == 128  # all of E
    assert not triton_plan.tile_config("fwd", 48, 40, 2, dev).tma  # masked dims: no TMA


def test_per_device_table_and_json(tmp_path):
    h200 = Tuning(fwd=Tiles(block_t=64, block_v=64, num_warps=8, num_stages=2),
                  decode=((0, 16, 2, 0), (4096, 128, 8, 1)))
    try:
        triton_tune.reset()
        assert triton_tune.tuning_for_name("NVIDIA H100 80GB HBM3") == triton_tune.SHIPPED["H100"]
        assert triton_tune.tuning_for_name("Some Future GPU") == triton_tune.DEFAULT
        path = tmp_path / "tuning.json"
        path.write_text(json.dumps({"H200": h200.to_json()}))
        triton_tune.load(str(path))
        got = triton_tune.tuning_for_name("NVIDIA H200")
        assert got == h200 and got.fwd.block_v == 64 and got.decode[1] == (4096, 128, 8, 1)
        with pytest.raises(ValueError, match="unknown lightning tuning fields"):
            triton_tune.load({"X": {"fwd": None, "bogus": 1}})
    finally:
        triton_tune.reset()


def test_decode_config_rows():
    from minimax01.ops.lightning.triton_decode import decode_config

    dev = torch.device("cpu")
    assert decode_config(1, 64, 128, 128, dev) == (16, 2, False)  # the >= 512 programs rule
    triton_tune.load({"cpu": Tuning(decode=((0, 32, 4, 0), (4096, 128, 8, 1))).to_json()})
    try:
        assert decode_config(1, 64, 128, 128, dev) == (32, 4, False)
        assert decode_config(64, 64, 128, 128, dev) == (128, 8, True)
        assert decode_config(64, 64, 64, 64, dev) == (64, 2, False)  # rows: D = E = 128 only
    finally:
        triton_tune.reset()
