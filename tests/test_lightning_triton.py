"""Triton lightning-attention kernels against the float64 references (SPEC §3).

Without CUDA the kernels run in Triton's interpreter on small shapes. The kernels pick
interpreted or compiled per launch from the tensors' device (triton_jit.py), so they work
whatever imported triton first; TRITON_INTERPRET=1 is still set while this module runs on a
CPU-only machine (and restored afterwards) for any kernel code imported during these tests.
GPU-only checks at larger shapes carry the `gpu` marker."""

import os

import pytest
import torch

from minimax01.ops import lightning_attn, lightning_decode
from minimax01.ops.lightning import triton_plan

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
F64 = torch.float64
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


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


def inputs(b, t, h, d, e, seed, dtype=torch.float32, slope=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, d, generator=g) * 0.5
    k = torch.randn(b, t, h, d, generator=g) * 0.5
    v = torch.randn(b, t, h, e, generator=g)
    if slope is None:  # fast decay exp(-2) down to almost none exp(-1e-3)
        slope = torch.logspace(-3, 0.3, h)
    return [x.to(DEV, dtype) for x in (q, k, v)] + [slope.float().to(DEV)]


def run_both(q, k, v, slope, s0=None, cu=None, block=None, seed=0, want=(True,) * 4):
    """Triton output, final state and gradients of a loss on both, and the float64 reference's."""
    g = torch.Generator().manual_seed(seed + 1000)
    o_shape = v.shape
    w_o = torch.randn(o_shape, generator=g, dtype=F64)
    n = q.shape[0] if cu is None else cu.numel() - 1
    w_s = torch.randn(n, q.shape[2], q.shape[3], v.shape[3], generator=g, dtype=F64)
    res = []
    for backend, cast in (("triton", lambda x: x), ("naive", lambda x: x.detach().cpu().double())):
        xs = [cast(x).clone().requires_grad_(w) for x, w in zip((q, k, v), want)]
        s = None if s0 is None else cast(s0).clone().requires_grad_(want[3])
        on_cpu = backend == "naive"
        o, st = lightning_attn(*xs, slope.cpu() if on_cpu else slope, initial_state=s,
                               output_final_state=True, backend=backend, block_size=block,
                               cu_seqlens=None if cu is None else (cu.cpu() if on_cpu else cu))
        loss = (o.double().cpu() * w_o).sum() + (st.double().cpu() * w_s).sum()
        leaves = [x for x in xs + [s] if x is not None and x.requires_grad]
        grads = torch.autograd.grad(loss, leaves)
        res.append((o, st, grads))
    return res


def assert_match(res, tol):
    (o, st, gr), (o_r, st_r, gr_r) = res
    assert o.dtype != F64 and st.dtype == torch.float32
    assert rel(o, o_r) < tol, rel(o, o_r)
    assert rel(st, st_r) < tol, rel(st, st_r)
    for a, b in zip(gr, gr_r):
        assert rel(a, b) < tol, rel(a, b)


@pytest.mark.parametrize("t,block,seg", [(1, 16, None), (16, 16, None), (45, 16, None),
                                         (45, 16, 16), (70, 32, 32), (100, 16, 48),
                                         (37, 64, None)])
@pytest.mark.parametrize("with_state", [False, True])
def test_forward_backward_fp32(t, block, seg, with_state):
    q, k, v, slope = inputs(2, t, 3, 16, 32, seed=t)
    s0 = torch.randn(2, 3, 16, 32, dtype=torch.float32).to(DEV) if with_state else None
    with triton_plan.override(**({"seg_len": seg} if seg else {})):
        res = run_both(q, k, v, slope, s0, block=block, seed=t)
    assert_match(res, 1e-4)


@pytest.mark.parametrize("d,e", [(32, 16), (16, 64), (48, 40)])
def test_other_head_dims(d, e):
    # non-power-of-two dims are masked inside the power-of-two tiles
    q, k, v, slope = inputs(1, 29, 2, d, e, seed=d + e)
    s0 = torch.randn(1, 2, d, e).to(DEV)
    with triton_plan.override(seg_len=16):
        res = run_both(q, k, v, slope, s0, block=16)
    assert_match(res, 1e-4)


@pytest.mark.parametrize("seg", [None, 16])
def test_varlen_one_launch(seg):
    # empty documents, documents shorter than a block, documents crossing blocks and segments
    lens = [5, 0, 1, 17, 40, 3, 0, 33]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32).to(DEV)
    q, k, v, slope = inputs(1, sum(lens), 2, 16, 16, seed=7)
    s0 = torch.randn(len(lens), 2, 16, 16).to(DEV)
    with triton_plan.override(**({"seg_len": seg} if seg else {})):
        res = run_both(q, k, v, slope, s0, cu=cu, block=16, seed=7)
        plan = triton_plan.make_plan(q.device, batch=1, seq=sum(lens), heads=2, n_value_tiles=1,
                                     cu_seqlens=cu.cpu())
        assert plan.segmented == bool(seg)
    assert_match(res, 1e-4)
    # the final state of an empty document is its initial state, its gradient passes through
    (_, st, _), _ = res
    torch.testing.assert_close(st[1], s0[1])


def test_varlen_equals_separate_calls():
    lens = [20, 7, 0, 38]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32).to(DEV)
    q, k, v, slope = inputs(1, sum(lens), 2, 16, 16, seed=8)
    o, st = lightning_attn(q, k, v, slope, cu_seqlens=cu, output_final_state=True,
                           backend="triton", block_size=16)
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o1, s1 = lightning_attn(q[:, a:b], k[:, a:b], v[:, a:b], slope, output_final_state=True,
                                backend="triton", block_size=16)
        assert rel(o[:, a:b], o1) < 1e-6 if b > a else o1.numel() == 0
        assert rel(st[n], s1[0]) < 1e-6 if b > a else st[n].abs().max() == 0


def test_block_size_does_not_change_results():
    q, k, v, slope = inputs(1, 90, 2, 32, 32, seed=9)
    s0 = torch.randn(1, 2, 32, 32).to(DEV)
    outs = []
    for block, seg in ((16, None), (32, None), (64, None), (128, None), (16, 32), (32, 64)):
        with triton_plan.override(**({"seg_len": seg} if seg else {})):
            outs.append(lightning_attn(q, k, v, slope, initial_state=s0, output_final_state=True,
                                       backend="triton", block_size=block))
    for o, st in outs[1:]:
        assert rel(o, outs[0][0]) < 1e-5 and rel(st, outs[0][1]) < 1e-5


def test_empty_sequence():
    q, k, v, slope = inputs(2, 0, 2, 16, 16, seed=10)
    s0 = torch.randn(2, 2, 16, 16).to(DEV)
    o, st = lightning_attn(q, k, v, slope, initial_state=s0, output_final_state=True,
                           backend="triton")
    assert o.shape == (2, 0, 2, 16)
    torch.testing.assert_close(st, s0)


def test_partial_requires_grad_and_no_final_state():
    q, k, v, slope = inputs(1, 33, 2, 16, 16, seed=11)
    qt = q.clone().requires_grad_()
    o, st = lightning_attn(qt, k, v, slope, backend="triton", block_size=16)
    assert st is None
    (o.float() ** 2).sum().backward()
    qr = q.double().cpu().requires_grad_()
    o_r, _ = lightning_attn(qr, k.double().cpu(), v.double().cpu(), slope.cpu(), backend="chunk")
    (o_r ** 2).sum().backward()
    assert rel(qt.grad, qr.grad) < 1e-4


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
def test_half_inputs(dtype, tol):
    q, k, v, slope = inputs(1, 50, 2, 32, 32, seed=12, dtype=dtype)
    s0 = torch.randn(1, 2, 32, 32).to(DEV)
    with triton_plan.override(seg_len=16):
        res = run_both(q, k, v, slope, s0, block=16, seed=12)
    assert res[0][0].dtype == dtype
    assert_match(res, tol)


def test_rejects_float64():
    q, k, v, slope = inputs(1, 4, 1, 16, 16, seed=13, dtype=F64)
    with pytest.raises(TypeError, match="fp16, bf16 or fp32"):
        lightning_attn(q, k, v, slope, backend="triton")


@pytest.mark.parametrize("slots", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_matches_recurrence(slots, dtype):
    q, k, v, slope = inputs(3, 5, 2, 16, 32, seed=14, dtype=dtype)
    o_ref, s_ref = lightning_attn(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                                  slope.cpu(), output_final_state=True, backend="recurrent")
    if slots:
        pool = torch.full((6, 2, 16, 32), float("nan")).to(DEV)
        idx = torch.tensor([4, 0, 2]).to(DEV)
        pool[idx] = 0
    else:
        pool, idx = torch.zeros(3, 2, 16, 32).to(DEV), None
    for t in range(5):
        o = lightning_decode(q[:, t], k[:, t], v[:, t], pool, slope, slot_idx=idx,
                             backend="triton")
        assert o.dtype == dtype
        assert rel(o, o_ref[:, t]) < (1e-5 if dtype == torch.float32 else 1e-2)
    got = pool[idx] if slots else pool
    assert rel(got, s_ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    if slots:
        assert torch.isnan(pool[[1, 3, 5]]).all()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("h,t,d,seg", [(4, 3000, 128, None), (2, 5000, 128, 1024),
                                       (4, 777, 64, None), (2, 1000, 256, 256)])
def test_gpu_bf16_large(h, t, d, seg):
    q, k, v, slope = inputs(2, t, h, d, d, seed=t, dtype=torch.bfloat16,
                            slope=torch.tensor([0.9, 1e-4, 0.3, 0.01])[:h])
    s0 = torch.randn(2, h, d, d).to(DEV)
    with triton_plan.override(**({"seg_len": seg} if seg else {})):
        o, st = lightning_attn(q, k, v, slope, initial_state=s0, output_final_state=True,
                               backend="triton")
    o_r, st_r = lightning_attn(q.float(), k.float(), v.float(), slope, initial_state=s0,
                               output_final_state=True, backend="chunk", block_size=128)
    assert rel(o, o_r) < 1e-2 and rel(st, st_r) < 1e-2
