"""Hostile inputs to the lightning ops: clear errors, never a silent truncation or a write out of
bounds; and no host synchronisation on the hot path for it (checks.py)."""

import os

import pytest
import torch

from minimax01.ops import lightning_attn, lightning_decode
from minimax01.ops.lightning import check_slot_idx, debug_checks

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


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


def qkv(b=1, t=6, h=2, d=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, t, h, d, generator=g).to(dtype) for _ in range(3)]


BACKENDS = ["chunk", "naive", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_float_qkv_refused(backend, dtype):
    q, k, v = qkv()
    bad = q.to(dtype) if dtype != torch.bool else q > 0
    for args in ((bad, k, v), (q, bad, v), (q, k, bad)):
        with pytest.raises(TypeError, match="floating-point"):
            lightning_attn(*args, torch.ones(2), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("slope", [[0.1, float("nan")], [0.1, float("inf")], [0.1, -0.5],
                                   [float("-inf"), 0.2]])
def test_bad_slopes_refused(backend, slope):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="slope must be finite and >= 0"):
        lightning_attn(q, k, v, torch.tensor(slope), backend=backend)


def test_slope_changed_in_place_is_checked_again():
    q, k, v = qkv()
    slope = torch.tensor([0.1, 0.2])
    lightning_attn(q, k, v, slope, backend="chunk")
    slope[1] = -1.0
    with pytest.raises(ValueError, match="slope"):
        lightning_attn(q, k, v, slope, backend="chunk")


@pytest.mark.parametrize("backend", BACKENDS)
def test_lists_give_type_errors(backend):
    q, k, v = qkv(t=6)
    with pytest.raises(TypeError, match="slope must be a torch.Tensor"):
        lightning_attn(q, k, v, [0.1, 0.2], backend=backend)
    with pytest.raises(TypeError, match="cu_seqlens must be a torch.Tensor"):
        lightning_attn(q, k, v, torch.ones(2), cu_seqlens=[0, 3, 6], backend=backend)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        lightning_attn(q.tolist(), k, v, torch.ones(2), backend=backend)
    with pytest.raises(TypeError, match="slope must be a floating-point"):
        lightning_attn(q, k, v, torch.ones(2, dtype=torch.int64), backend=backend)


@pytest.mark.parametrize("cu", [[0, 3, 7], [1, 6], [0, 4, 2, 6]])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_host_offsets_refused(cu, backend):
    q, k, v = qkv(t=6)
    with pytest.raises(ValueError, match="cu_seqlens"):
        lightning_attn(q, k, v, torch.ones(2), cu_seqlens=torch.tensor(cu), backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_non_integer_offsets_refused(dtype):
    q, k, v = qkv(t=6)
    with pytest.raises(ValueError, match="integer"):
        lightning_attn(q, k, v, torch.ones(2), cu_seqlens=torch.tensor([0, 3, 6]).to(dtype))


def test_max_seqlen():
    q, k, v = qkv(t=6)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    o, _ = lightning_attn(q, k, v, torch.ones(2) * 0.1, cu_seqlens=cu, max_seqlen=4,
                          backend="triton")
    o_r, _ = lightning_attn(q, k, v, torch.ones(2) * 0.1, cu_seqlens=cu, backend="chunk")
    torch.testing.assert_close(o, o_r, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="max_seqlen"):
        lightning_attn(q, k, v, torch.ones(2), cu_seqlens=cu, max_seqlen=3, backend="triton")
    with pytest.raises(TypeError, match="max_seqlen"):
        lightning_attn(q, k, v, torch.ones(2), cu_seqlens=cu, max_seqlen=4.0, backend="triton")


def test_no_host_sync_on_the_triton_path(monkeypatch):
    """With device-resident offsets and a slope already seen, nothing is read back: every
    Tensor read-back (tolist, item, bool, int) is made to fail."""
    q, k, v = (x.to(DEV) for x in qkv(t=6))
    slope = torch.tensor([0.1, 0.2], device=DEV)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32, device=DEV)
    lightning_attn(q, k, v, slope, backend="triton")  # the slope's one check
    if not CUDA:
        pytest.skip("device-resident offsets need CUDA (on the CPU they are host data)")

    def boom(*a, **kw):
        raise AssertionError("host sync on the hot path")

    for name in ("tolist", "item", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    lightning_attn(q, k, v, slope, cu_seqlens=cu, backend="triton")


# ---- decode --------------------------------------------------------------------------------

def decode_inputs(b=3, n=6, h=2, d=16, e=16):
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(b, h, d, generator=g) for _ in range(2))
    v = torch.randn(b, h, e, generator=g)
    pool = torch.randn(n, h, d, e, generator=g)
    return q.to(DEV), k.to(DEV), v.to(DEV), pool.to(DEV), torch.tensor([0.1, 0.5], device=DEV)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("slots,match", [([0, -1, 2], r"in \[0, 6\)"), ([0, 6, 2], r"in \[0, 6\)"),
                                         ([0, 2**40, 1], r"in \[0, 6\)"), ([4, 1, 4], "repeat")])
def test_bad_host_slots_refused(backend, slots, match):
    q, k, v, pool, slope = decode_inputs()
    before = pool.clone()
    with pytest.raises(ValueError, match=match):
        lightning_decode(q, k, v, pool, slope, slot_idx=torch.tensor(slots), backend=backend)
    assert torch.equal(pool, before)


@pytest.mark.parametrize("slots", [[0.0, 1.0, 2.0], [True, False, True]])
def test_non_integer_slots_refused(slots):
    q, k, v, pool, slope = decode_inputs()
    with pytest.raises(TypeError, match="integer"):
        lightning_decode(q, k, v, pool, slope, slot_idx=torch.tensor(slots))
    with pytest.raises(TypeError, match="slot_idx must be a torch.Tensor"):
        lightning_decode(q, k, v, pool, slope, slot_idx=[0, 1, 2])


def test_check_slot_idx_helper():
    check_slot_idx([3, 0, 5], 6)
    with pytest.raises(ValueError, match="repeat"):
        check_slot_idx([3, 3], 6)
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        check_slot_idx([-1], 6)


def test_kernel_ignores_bad_device_slots():
    """Indices the host never reads (as on the GPU): a bad row touches nothing and gives NaN
    outputs; the good rows are updated as usual. Calls the kernel wrapper directly (on the CPU a
    slot tensor is host data, which lightning_decode checks and refuses)."""
    from minimax01.ops.lightning.triton_decode import triton_lightning_decode

    q, k, v, pool, slope = decode_inputs()
    ref_pool = pool.clone()
    idx = torch.tensor([4, -1, 2**33 + 1], device=DEV)  # negative, and one that wraps in int32
    o = triton_lightning_decode(q, k, v, pool, slope, slot_idx=idx)
    assert torch.isnan(o[1:]).all() and torch.isfinite(o[0]).all()
    o_ref = lightning_decode(q[:1], k[:1], v[:1], ref_pool, slope, slot_idx=torch.tensor([4]),
                             backend="torch")
    torch.testing.assert_close(o[:1], o_ref)
    torch.testing.assert_close(pool, ref_pool)  # row 4 updated the same way; nothing else


@pytest.mark.skipif(CUDA, reason="a device assert would kill the CUDA context")
def test_debug_checks_assert_on_device_values(monkeypatch):
    """The device-value path (no read-back) under debug checks: torch._assert_async, which on
    the CPU raises at once (on CUDA it is a graph-capturable device assert). CPU tensors stand in
    for device ones by making `_on_host` say no."""
    from minimax01.ops.lightning import checks

    monkeypatch.setattr(checks, "_on_host", lambda x: False)
    good_cu, bad_cu = torch.tensor([0, 3, 6]), torch.tensor([0, 4, 2, 6])
    checks.check_cu_seqlens(bad_cu, 6, 1, host=False)        # debug off: not read
    checks.check_decode_slots(torch.tensor([1, 1]), 2, 4)
    with debug_checks(True):
        checks.check_cu_seqlens(good_cu, 6, 1, host=False)
        checks.check_decode_slots(torch.tensor([3, 1]), 2, 4)
        with pytest.raises(RuntimeError):
            checks.check_cu_seqlens(bad_cu, 6, 1, host=False)
        with pytest.raises(RuntimeError):
            checks.check_decode_slots(torch.tensor([1, 1]), 2, 4)   # repeated
        with pytest.raises(RuntimeError):
            checks.check_decode_slots(torch.tensor([1, 4]), 2, 4)   # out of range


def test_inference_mode_slopes():
    q, k, v = qkv()
    with torch.inference_mode():
        slope = torch.tensor([0.1, 0.2])
        lightning_attn(q, k, v, slope, backend="chunk")
        lightning_attn(q, k, v, slope, backend="chunk")  # the cached check
        with pytest.raises(ValueError, match="slope"):
            lightning_attn(q, k, v, torch.tensor([0.1, -1.0]), backend="chunk")
