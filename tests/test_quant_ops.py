"""8-bit weights (ops/quant): the formats' provable error bounds, the Triton grouped / dense
matmuls against their plain-PyTorch twin (Triton's interpreter on the CPU, small shapes), and the
matmul error against the 16/32-bit weights on random and structured (outlier channels, zero rows)
weights. GPU-only checks at Text-01 widths carry the `gpu` marker."""

import pytest
import torch

from minimax01.ops.quant import (dequantize, grouped_mm_q, grouped_mm_q_torch, linear_q, quantize,
                                 scaled_available, scaled_twin)

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")
FP8_REL, FP8_SUB = 2.0 ** -4, 2.0 ** -10


def weights(kind: str, shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g)
    if kind == "outlier_rows":      # a few output channels 100x larger
        w[..., ::7, :] *= 100.0
    elif kind == "outlier_cols":    # a few input channels 50x larger (hurts every row's scale)
        w[..., :, ::5] *= 50.0
    elif kind == "zero_rows":
        w[..., 1::3, :] = 0.0
    elif kind == "heavy_tail":
        w = w * torch.exp(2 * torch.randn(*shape, generator=g))
    return w


KINDS = ["random", "outlier_rows", "outlier_cols", "zero_rows", "heavy_tail"]


def elementwise_bound(w, s, fmt):
    """Per-element |w - q*s| bound of each format (schemes.py)."""
    s = s.to(w.dtype)
    if fmt == "int8":
        return (s / 2)[..., None].expand_as(w)
    return torch.maximum(FP8_REL * w.abs(), FP8_SUB * s[..., None])


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("kind", KINDS)
def test_quantize_error_bound(fmt, kind):
    w = weights(kind, (3, 40, 24))
    q, s = quantize(w, fmt)
    assert q.dtype == (torch.int8 if fmt == "int8" else torch.float8_e4m3fn)
    assert s.shape == (3, 40) and s.dtype == torch.float32 and (s > 0).all()
    err = (w - dequantize(q, s)).abs()
    bound = elementwise_bound(w, s, fmt) * (1 + 1e-6) + 1e-30
    assert (err <= bound).all(), (err / bound).max()
    if fmt == "int8":
        assert q.abs().max() <= 127
        assert (q.abs().amax(-1)[w.abs().amax(-1) > 0] == 127).all()  # full range used per row
    else:
        assert q.float().abs().max() <= 448
    if kind == "zero_rows":  # exact zeros back, scale 1
        assert (dequantize(q, s)[:, 1::3] == 0).all() and (s[:, 1::3] == 1).all()


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantize_row_blocks_equal_whole(fmt):
    """Quantising any block of whole rows gives the whole tensor's bytes (what loaders rely on)."""
    w = weights("outlier_rows", (4, 30, 16), seed=1).bfloat16()
    q, s = quantize(w, fmt)
    q1, s1 = quantize(w[2, 7:19], fmt)
    assert torch.equal(q1.view(torch.uint8), q[2, 7:19].view(torch.uint8))
    assert torch.equal(s1, s[2, 7:19])


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="int8, fp8"):
        quantize(torch.ones(2, 2), "int4")
    with pytest.raises(ValueError, match="at least 2 dims"):
        quantize(torch.ones(4), "int8")


# ------------------------------------------------------------------ kernels vs twin
def grouped_inputs(fmt, e, n, k, counts, dtype, kind="random", seed=0):
    g = torch.Generator().manual_seed(seed + 7)
    q, s = quantize(weights(kind, (e, n, k), seed), fmt)
    x = torch.randn(sum(counts), k, generator=g).to(dtype)
    return x, q, s, torch.tensor(counts)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_triton_matches_twin(fmt, dtype):
    # ragged groups, an empty group, K and N not multiples of the interpreter's blocks
    x, q, s, counts = grouped_inputs(fmt, 4, 40, 72, [5, 0, 17, 3], dtype, kind="outlier_rows")
    want = grouped_mm_q_torch(x, q, s, counts)
    got = grouped_mm_q(x, q, s, counts, backend="triton")
    assert got.dtype == dtype and got.shape == (25, 40)
    tol = 1e-6 if dtype == torch.float32 else 2 ** -7
    assert rel(got, want) < tol
    assert (got.double() - want.double()).abs().max() <= tol * 4 * want.double().abs().max()


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_dense_triton_matches_twin(fmt):
    g = torch.Generator().manual_seed(3)
    q, s = quantize(weights("zero_rows", (50, 48)), fmt)
    x = torch.randn(2, 9, 48, generator=g)
    got = linear_q(x, q, s, backend="triton")
    want = linear_q(x, q, s, backend="torch")
    assert got.shape == (2, 9, 50)
    assert rel(got, want) < 1e-6
    assert (got[..., 1::3] == 0).all()  # zero rows of the weight give exact zeros


def test_grouped_empty_and_default_backend():
    x, q, s, counts = grouped_inputs("int8", 3, 16, 16, [0, 0, 0], torch.float32)
    assert grouped_mm_q(x, q, s, counts).shape == (0, 16)
    assert grouped_mm_q(x, q, s, counts, backend="triton").shape == (0, 16)
    x, q, s, counts = grouped_inputs("int8", 3, 16, 16, [2, 1, 0], torch.float32)
    assert torch.equal(grouped_mm_q(x, q, s, counts), grouped_mm_q_torch(x, q, s, counts))
    with pytest.raises(ValueError, match="backend"):
        grouped_mm_q(x, q, s, counts, backend="cuda")
    with pytest.raises(ValueError, match="fp8 weights"):
        grouped_mm_q(x, q, s, counts, backend="scaled")


# ------------------------------------------------------------------ error against full precision
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("kind", KINDS)
def test_grouped_error_bound_vs_full_precision(fmt, kind):
    """|x (w - w_hat)^T| <= |x| bound^T elementwise: the matmul error is provably bounded by the
    weights' per-element bound, for every weight structure; plus a typical-size check."""
    e, n, k = 3, 24, 40
    w = weights(kind, (e, n, k), seed=5).double()
    q, s = quantize(w, fmt)
    counts = torch.tensor([4, 6, 2])
    x = torch.randn(12, k, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    exact = torch.cat([xe @ w[i].t() for i, xe in enumerate(torch.split(x, [4, 6, 2]))])
    got = grouped_mm_q_torch(x, q, s, counts)
    bound = torch.cat([xe.abs() @ elementwise_bound(w[i], s[i], fmt).t()
                       for i, xe in enumerate(torch.split(x, [4, 6, 2]))])
    assert ((got - exact).abs() <= bound * (1 + 1e-9) + 1e-12).all()
    typical = {"int8": 0.01, "fp8": 0.04}[fmt]
    if kind == "outlier_cols" and fmt == "int8":  # column outliers cost every row resolution
        typical = 0.02
    assert rel(got, exact) < typical, rel(got, exact)


def test_scaled_twin_error():
    """The fp8 tensor-core path quantises activations too (W8A8): bounded, a bit above W8A16."""
    e, n, k = 2, 32, 64
    w = weights("heavy_tail", (e, n, k), seed=2)
    q, s = quantize(w, "fp8")
    counts = torch.tensor([5, 7])
    x = torch.randn(12, k, generator=torch.Generator().manual_seed(1))
    exact = torch.cat([xe @ w[i].t() for i, xe in enumerate(torch.split(x, [5, 7]))])
    w8a16 = rel(grouped_mm_q_torch(x, q, s, counts), exact)
    w8a8 = rel(scaled_twin(x, q, s, counts), exact)
    assert w8a16 < 0.04 and w8a8 < 0.06 and w8a8 > w8a16 * 0.5
    dense = rel(scaled_twin(x, q[0], s[0], None), x @ w[0].t())
    assert dense < 0.06


# ------------------------------------------------------------------ GPU
@gpu
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("rows", [[1, 0, 1, 0] * 8, [3] * 32, [517, 0, 260] + [400] * 29])
def test_gpu_grouped_text01_widths(fmt, rows):
    dev = "cuda"
    h, i = 6144, 1024  # Text-01 hidden, a slice of the intermediate (memory)
    g = torch.Generator(device=dev).manual_seed(0)
    w = torch.randn(32, 2 * i, h, device=dev, generator=g, dtype=torch.bfloat16)
    q, s = quantize(w, fmt)
    x = torch.randn(sum(rows), h, device=dev, generator=g, dtype=torch.bfloat16)
    counts = torch.tensor(rows, device=dev)
    want = grouped_mm_q_torch(x, q, s, counts)
    got = grouped_mm_q(x, q, s, counts, backend="triton")
    assert rel(got.float(), want.float()) < 2 ** -7
    if fmt == "fp8" and scaled_available(x.device):
        got = grouped_mm_q(x, q, s, counts, backend="scaled")
        assert rel(got.float(), scaled_twin(x, q, s, counts).float()) < 2 ** -6
