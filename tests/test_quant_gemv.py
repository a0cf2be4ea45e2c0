"""The GEMV form of the 8-bit grouped matmul (ops/quant/triton_gemv_w8.py, configs with BLOCK_M < 16)
against the plain-PyTorch twin in Triton's interpreter: dense and grouped, 1-8 rows a group,
empty groups, N and K that no block divides, split-K (the split-sum kernel), bf16 and fp32
activations, int8 and fp8; the magic-number int8 widening exact for all 256 byte values; the
dispatch sending few rows per group to it. Tiny shapes: the interpreter is slow."""

import pytest
import torch

from minimax01.ops.quant import grouped as gq
from minimax01.ops.quant import grouped_mm_q, grouped_mm_q_torch, linear_q, quantize
from minimax01.ops.quant import triton_w8 as tw


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def case(fmt, counts, n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(len(counts), n, k, generator=g)
    w[:, ::5] *= 20.0  # outlier output channels
    q, s = quantize(w, fmt)
    x = torch.randn(sum(counts), k, generator=g).to(dtype)
    return x, q, s, torch.tensor(counts)


def check(got, want, dtype):
    tol = 1e-6 if dtype == torch.float32 else 2 ** -7
    assert got.dtype == want.dtype and got.shape == want.shape
    assert rel(got, want) < tol, rel(got, want)


def grouped(cfg, x, q, s, counts):
    return tw.grouped_w8(x, q, s, gq._offsets(counts, x.device), config=cfg)


# (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, warps, stages): 1-8 rows a pass, split-K 1-3, blocks that
# N = 24 and K = 72 do not divide (the masked paths) and that they do
GEMV = [(1, 16, 32, 1, 4, 1), (2, 16, 64, 3, 4, 1), (4, 32, 16, 1, 4, 1), (8, 8, 32, 2, 4, 1)]


@pytest.mark.parametrize("cfg", GEMV, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gemv_grouped_matches_twin(cfg, dtype):
    # empty groups first, inside and last; 1..8 rows; more rows than BLOCK_M (a second pass)
    x, q, s, counts = case("int8", [0, 1, 0, 3, 8, 2, 0], 24, 72, dtype, seed=cfg[0])
    check(grouped(cfg, x, q, s, counts), grouped_mm_q_torch(x, q, s, counts), dtype)


@pytest.mark.parametrize("cfg", GEMV[:2], ids=lambda c: "x".join(map(str, c)))
def test_gemv_fp8_and_even_shapes(cfg):
    x, q, s, counts = case("fp8", [2, 0, 1, 0], 32, 64, torch.bfloat16, seed=7)
    check(grouped(cfg, x, q, s, counts), grouped_mm_q_torch(x, q, s, counts), torch.bfloat16)


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("cfg", [(1, 16, 32, 1, 4, 1), (4, 8, 16, 4, 4, 1)],
                         ids=lambda c: "x".join(map(str, c)))
def test_gemv_dense_matches_twin(m, cfg):
    x, q, s, _ = case("int8", [m], 40, 72, torch.float32, seed=m)
    got = tw.grouped_w8(x, q[0], s[0], None, config=cfg)
    check(got, grouped_mm_q_torch(x, q[:1], s[:1], torch.tensor([m])), torch.float32)


def test_gemv_compact_grid_batch_one():
    """2 rows over 32 experts (batch 1, top-2): 2 programs on the group axis find 3 and 29."""
    counts = [0] * 32
    counts[3] = counts[29] = 1
    x, q, s, counts = case("int8", counts, 16, 32, torch.bfloat16, seed=3)
    check(grouped((1, 16, 32, 2, 4, 1), x, q, s, counts), grouped_mm_q_torch(x, q, s, counts),
          torch.bfloat16)


def test_int8_widening_exact_for_every_byte():
    """Every int8 value, -128 included, through the magic-number widening: one-hot rows pick
    single weights, so the fp32 output is q * scale exactly (one split and three)."""
    k = 256
    q = ((torch.arange(16)[:, None] * 37 + torch.arange(k)[None, :]) % 256 - 128).to(torch.int8)
    s = torch.rand(16) + 0.5
    x = torch.eye(k)[::17].contiguous()  # 16 one-hot rows
    want = (q.float() * s[:, None])[:, ::17].t()
    for cfg in [(8, 16, 64, 1, 4, 1), (4, 16, 32, 3, 4, 1)]:
        assert torch.equal(tw.grouped_w8(x, q, s, None, config=cfg), want)
    assert torch.equal(tw.grouped_w8(x, q, s, None, config=(16, 16, 32, 1, 4, 1)), want)  # dot


def test_split_sum_covers_every_k_once():
    q = torch.ones(2, 16, 160, dtype=torch.int8)
    s = torch.full((2, 16), 0.5)
    x = torch.ones(3, 160)
    counts = torch.tensor([1, 2])
    for cfg in [(1, 16, 32, 8, 4, 1), (2, 16, 64, 3, 4, 1), (4, 16, 16, 16, 4, 1)]:
        assert torch.equal(grouped(cfg, x, q, s, counts), torch.full((3, 16), 80.0))


def test_dispatch_sends_few_rows_to_the_gemv(monkeypatch):
    seen = []
    launch = tw._launch
    monkeypatch.setattr(tw, "_launch", lambda cfg, *a: (seen.append(cfg), launch(cfg, *a)))
    x, q, s, counts = case("int8", [2, 0, 1], 16, 32, torch.bfloat16)
    y = grouped_mm_q(x, q, s, counts, backend="triton")
    check(y, grouped_mm_q_torch(x, q, s, counts), torch.bfloat16)
    check(linear_q(x[:2], q[0], s[0], backend="triton"),
          linear_q(x[:2], q[0], s[0], backend="torch"), torch.bfloat16)
    assert seen == [tw._INTERPRETED_GEMV] * 2 and tw._INTERPRETED_GEMV[0] < 16
    # on CUDA: the run-time shortlist for <= GEMV_MAX_ROWS rows a group starts with GEMV tiles
    for rows in (1, 2, 3, 8):
        first = tw.candidates(rows)[0]
        assert first[0] < 16
    assert tw.candidates(16)[0][0] >= 16 and tw.candidates(64) is tw._MEDIUM
    assert all(tw.is_decode_config(c) for b in (1, 4) for c in tw.candidates(b))
    assert not any(tw.is_decode_config(c) for c in tw.LARGE_SPACE)


CUDA = torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_gemv_text01_widths():
    """Every GEMV config of the decode space, compiled, on one Text-01 expert pair at batch 1
    (2 of 32 groups, compact grid) and a dense projection at 1 and 8 rows."""
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    q, s = quantize(torch.randn(32, 1024, 6144, device=dev, generator=g) * 0.01, "int8")
    counts = torch.zeros(32, dtype=torch.int64, device=dev)
    counts[[4, 17]] = 1
    x = torch.randn(2, 6144, device=dev, generator=g).to(torch.bfloat16)
    want = grouped_mm_q_torch(x, q, s, counts)
    qd, sd = quantize(torch.randn(3072, 6144, device=dev, generator=g), "int8")
    xd = torch.randn(8, 6144, device=dev, generator=g).to(torch.bfloat16)
    want_d = linear_q(xd, qd, sd, backend="torch")
    for cfg in [c for c in tw.SMALL_SPACE if c[0] < 16]:
        check(grouped(cfg, x, q, s, counts), want, torch.bfloat16)
        for m in (1, 8):
            check(tw.grouped_w8(xd[:m], qd, sd, None, config=cfg), want_d[:m], torch.bfloat16)
    check(grouped_mm_q(x, q, s, counts), want, torch.bfloat16)  # the tuned default
