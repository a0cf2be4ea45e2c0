"""Every tile config of the 8-bit grouped matmul (ops/quant/triton_w8.py: GEMV tiles for 1-8 rows,
tensor-core tiles, split-K) against the plain-PyTorch twin in Triton's interpreter, on ragged
groups with empty experts, K and N that no block divides, and the dequantise-then-16-bit-matmul
prefill path (grouped.py "dequant", chunked over a small workspace) against the same twin."""

import pytest
import torch

from minimax01.ops.quant import grouped as gq
from minimax01.ops.quant import grouped_mm_q, grouped_mm_q_torch, linear_q, quantize
from minimax01.ops.quant import triton_w8 as tw
from minimax01.ops.quant.schemes import dequantize

GEMV_SHORTLISTS = [c for b in sorted(tw._GEMV) for c in tw._GEMV[b]]
ALL_CONFIGS = sorted(set(tw.SMALL_SPACE + tw.LARGE_SPACE + tw._DECODE + tw._MEDIUM
                         + tw._PREFILL + GEMV_SHORTLISTS + [tw._INTERPRETED,
                                                            tw._INTERPRETED_GEMV]))


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def case(fmt, counts, n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(len(counts), n, k, generator=g)
    w[:, ::7] *= 30.0  # outlier output channels
    q, s = quantize(w, fmt)
    x = torch.randn(sum(counts), k, generator=g).to(dtype)
    return x, q, s, torch.tensor(counts)


def check(got, want, dtype):
    tol = 1e-6 if dtype == torch.float32 else 2 ** -7
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.isfinite(got.float()).all()
    assert rel(got, want) < tol, rel(got, want)
    assert (got.double() - want.double()).abs().max() <= tol * 4 * want.double().abs().max()


def run_cfg(cfg, x, q, s, counts):
    return tw.grouped_w8(x, q, s, gq._offsets(counts, x.device), config=cfg)


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=lambda c: "x".join(map(str, c)))
def test_every_config_matches_twin(cfg):
    # ragged groups with empty experts first, inside and last; K = 72 and N = 24 fit no block
    x, q, s, counts = case("int8", [0, 5, 0, 9, 3, 0], 24, 72, torch.bfloat16)
    check(run_cfg(cfg, x, q, s, counts), grouped_mm_q_torch(x, q, s, counts), torch.bfloat16)
    # decode-like: one row per touched expert, K a multiple of every block (the EVEN_K path)
    x, q, s, counts = case("fp8", [1, 0, 2, 0], 16, 256, torch.bfloat16, seed=1)
    check(run_cfg(cfg, x, q, s, counts), grouped_mm_q_torch(x, q, s, counts), torch.bfloat16)


@pytest.mark.parametrize("cfg", sorted(set(tw._DECODE + tw._MEDIUM + tw._PREFILL
                                           + GEMV_SHORTLISTS)),
                         ids=lambda c: "x".join(map(str, c)))
def test_runtime_configs_fp32_and_dense(cfg):
    x, q, s, counts = case("int8", [3, 0, 9], 24, 72, torch.float32, seed=2)
    check(run_cfg(cfg, x, q, s, counts), grouped_mm_q_torch(x, q, s, counts), torch.float32)
    got = tw.grouped_w8(x, q[0], s[0], None, config=cfg)
    check(got, grouped_mm_q_torch(x, q[:1], s[:1], torch.tensor([12])), torch.float32)


def test_split_k_covers_every_k_once():
    """Split-K with more splits than K blocks and a last split past K (all ones: exact sums)."""
    q = torch.ones(2, 16, 160, dtype=torch.int8)
    s = torch.full((2, 16), 0.5)
    x = torch.ones(3, 160)
    counts = torch.tensor([1, 2])
    for cfg in [(16, 16, 32, 4, 4, 1), (1, 16, 32, 8, 4, 1), (2, 16, 64, 3, 4, 1)]:
        assert torch.equal(run_cfg(cfg, x, q, s, counts), torch.full((3, 16), 80.0))


@pytest.mark.parametrize("cfg", [tw._INTERPRETED, (1, 16, 32, 2, 4, 2)])
def test_compact_grid_finds_the_routed_experts(cfg):
    """Batch 1 at 32 experts: 2 rows, so 2 programs on the group axis find experts 5 and 30."""
    counts = [0] * 32
    counts[5] = counts[30] = 1
    x, q, s, counts = case("int8", counts, 16, 64, torch.float32, seed=5)
    check(run_cfg(cfg, x, q, s, counts), grouped_mm_q_torch(x, q, s, counts), torch.float32)


def test_all_empty_and_bad_configs():
    x, q, s, counts = case("int8", [0, 0], 16, 32, torch.bfloat16)
    assert run_cfg(tw.SMALL_SPACE[0], x, q, s, counts).shape == (0, 16)
    x, q, s, counts = case("int8", [1, 1], 16, 32, torch.bfloat16)
    for bad in [(3, 16, 32, 1, 4, 1), (16, 8, 32, 1, 4, 1), (16, 16, 32, 0, 4, 1), (16, 16, 32)]:
        with pytest.raises(ValueError, match="config"):
            run_cfg(bad, x, q, s, counts)


def test_tuning_helpers():
    offs = tw.balanced_offs(10, 4, "cpu")
    assert offs.tolist() == [0, 3, 6, 8, 10]
    assert tw.balanced_offs(2, 32, "cpu")[:4].tolist() == [0, 1, 2, 2]
    assert [tw.rows_bucket(m) for m in (0, 1, 2, 3, 96, 16384)] == [1, 1, 2, 4, 128, 16384]
    assert tw.candidates(1) is tw._GEMV[1] and tw.candidates(3) is tw._GEMV[4]
    assert tw.candidates(16) is tw._DECODE and tw.candidates(48) is tw._MEDIUM
    assert tw.candidates(512) is tw._PREFILL
    assert tw.shipped_for(torch.device("cpu")) == {}
    for entry in tw.SHIPPED.values():
        for key, cfg in entry.items():
            assert tw.check_config(cfg) == cfg and len(key) == 5


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantize_kernel_is_exact(fmt, dtype):
    g = torch.Generator().manual_seed(4)
    q, s = quantize(torch.randn(3, 37, 70, generator=g) * 5, fmt)
    out = torch.empty(q.shape, dtype=dtype)
    got, want = tw.dequantize_w8(q, s, out), dequantize(q, s, dtype)
    if dtype == torch.float32:
        assert torch.equal(got, want)
    else:  # the interpreter truncates fp32 -> bf16 (a GPU rounds to nearest): within one ulp
        ulp = 2.0 ** (torch.floor(torch.log2(want.float().abs().clamp_min(1e-30))) - 7)
        assert ((got.float() - want.float()).abs() <= ulp).all()
    with pytest.raises(ValueError, match="contiguous"):
        tw.dequantize_w8(q.transpose(-1, -2), s, out)


# ------------------------------------------------------------------ the prefill "dequant" path
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("limit", [None, 1, 40 * 24 * 4 * 2])  # one chunk, one expert, two
def test_dequant_grouped_matches_twin(fmt, dtype, limit):
    x, q, s, counts = case(fmt, [4, 0, 0, 7, 1, 0], 40, 24, dtype, seed=3)
    got = gq.dequant_grouped(x, q, s, counts, workspace_bytes=limit)
    check(got, grouped_mm_q_torch(x, q, s, counts), dtype)


def test_dequant_backend_dense_and_empty():
    x, q, s, counts = case("int8", [5, 0, 3], 40, 24, torch.float32)
    check(grouped_mm_q(x, q, s, counts, backend="dequant"), grouped_mm_q_torch(x, q, s, counts),
          torch.float32)
    assert grouped_mm_q(x[:0], q, s, counts * 0, backend="dequant").shape == (0, 40)
    xd = torch.randn(2, 7, 24)
    want = linear_q(xd, q[0], s[0], backend="torch")
    check(linear_q(xd, q[0], s[0], backend="dequant"), want, torch.float32)
    check(gq.dequant_dense(xd.reshape(14, 24), q[0], s[0], workspace_bytes=24 * 4 * 16),
          want.reshape(14, 40), torch.float32)


def test_dequant_workspace_reused_not_under_autograd():
    x, q, s, counts = case("int8", [3, 2], 16, 24, torch.float32)
    gq.dequant_grouped(x, q, s, counts)
    buf = gq._workspace[("cpu", torch.float32)]
    gq.dequant_grouped(x, q, s, counts)
    assert gq._workspace[("cpu", torch.float32)] is buf  # one buffer, reused
    xr = x.clone().requires_grad_(True)
    y = gq.dequant_grouped(xr, q, s, counts)
    gq.dequant_grouped(x, -q, s, counts)  # overwrites the workspace: the backward must not care
    y.sum().backward()
    want = torch.cat([dequantize(q[0], s[0]).sum(0).expand(3, -1),
                      dequantize(q[1], s[1]).sum(0).expand(2, -1)])
    assert torch.allclose(xr.grad, want, rtol=1e-6, atol=1e-5)


def test_auto_backend_rule():
    rows = gq.DEQUANT_MIN_ROWS
    bf = torch.bfloat16
    assert gq.auto_backend(False, 2, bf, False) == "triton"
    assert gq.auto_backend(False, rows - 1, bf, False) == "triton"
    assert gq.auto_backend(False, rows, bf, False) == "dequant"
    assert gq.auto_backend(False, rows, torch.float32, False) == "triton"
    assert gq.auto_backend(True, gq.SCALED_MIN_ROWS, bf, True) == "scaled"
    assert gq.auto_backend(True, rows, bf, False) == "dequant"
    assert gq.auto_backend(True, 4, bf, True) == "triton"


def test_tuning_drops_wrong_candidates_and_times_a_balanced_routing(monkeypatch):
    """_tune (CUDA timing replaced by a fake clock): a candidate whose output is off is never
    chosen however fast, and the launches it times see the balanced routing, not the batch's."""
    x, q, s, counts = case("int8", [7, 0, 0, 0], 16, 32, torch.bfloat16)  # all rows on expert 0
    good, fast_but_wrong = (16, 16, 32, 1, 4, 1), (1, 16, 32, 1, 4, 2)
    monkeypatch.setattr(tw, "candidates", lambda rows: [fast_but_wrong, good])
    seen = []
    launch = tw._launch

    def fake_launch(cfg, x, q, scale, y, offs, *rest):
        seen.append(offs.tolist())
        launch(cfg, x, q, scale, y, offs, *rest)
        if cfg == fast_but_wrong:
            y.mul_(1.1)

    monkeypatch.setattr(tw, "_launch", fake_launch)
    monkeypatch.setattr(tw, "time_config", lambda cfg, args: 1.0 if cfg == fast_but_wrong else 2.0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    y = torch.empty(7, 16, dtype=torch.bfloat16)
    args = (x, q, s, y, gq._offsets(counts, x.device), 7, 4, 2, False)
    assert tw._tune(("test-key",), args) == good
    assert seen and all(o == [0, 2, 4, 6, 7] for o in seen)
    tw._best.pop(("test-key",))


# ------------------------------------------------------------------ GPU (compiled kernels)
CUDA = torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_every_config_and_the_dequant_path():
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    for fmt in ("int8", "fp8"):
        q, s = quantize(torch.randn(8, 384, 1024, device=dev, generator=g), fmt)
        for rows in ([1, 0, 0, 1, 0, 0, 0, 0], [3, 5, 0, 2, 4, 1, 0, 9], [200, 0, 130] + [64] * 5):
            counts = torch.tensor(rows, device=dev)
            x = torch.randn(sum(rows), 1024, device=dev, generator=g).to(torch.bfloat16)
            want = grouped_mm_q_torch(x, q, s, counts)
            for cfg in ALL_CONFIGS:
                check(run_cfg(cfg, x, q, s, counts), want, torch.bfloat16)
            check(grouped_mm_q(x, q, s, counts, backend="triton"), want, torch.bfloat16)
            for limit in (None, 384 * 1024 * 2 * 3):  # one chunk; 3 experts a chunk
                check(gq.dequant_grouped(x, q, s, counts, workspace_bytes=limit), want,
                      torch.bfloat16)
        xd = torch.randn(700, 1024, device=dev, generator=g).to(torch.bfloat16)
        want = linear_q(xd, q[0], s[0], backend="torch")
        check(linear_q(xd, q[0], s[0], backend="dequant"), want, torch.bfloat16)
        check(linear_q(xd[:3], q[0], s[0]), want[:3], torch.bfloat16)
        out = torch.empty(q.shape, dtype=torch.bfloat16, device=dev)
        assert torch.equal(tw.dequantize_w8(q, s, out), dequantize(q, s, torch.bfloat16))
