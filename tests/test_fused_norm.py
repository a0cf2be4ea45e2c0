"""ops/fused_norm: the Triton row norms (interpreted on the CPU) against their twins, which are
the model's own formulas (model/layers.py). On the CPU the 16-bit rounding points are checked
in fp16 (Triton's interpreter truncates fp32 -> bf16 instead of rounding it); bf16 runs on GPU."""

import pytest
import torch

from minimax01.ops.fused_norm import (gated_rms_norm, residual_rms_norm, torch_gated_rms_norm,
                                      torch_residual_rms_norm)
from minimax01.ops.norm import rms_norm

pytest.importorskip("triton")


ULP = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}


def rows(n, width, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, width, generator=g) * 3).to(dtype).to(DEV)


HALF = [torch.float32, torch.float16,
        pytest.param(torch.bfloat16, marks=[pytest.mark.gpu, pytest.mark.skipif(
            not torch.cuda.is_available(), reason="bf16 rounding needs compiled Triton")])]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("width", [96, 128])
def test_residual_rms_norm_matches_the_model(dtype, width):
    x, r = rows(37, width, dtype, 0), rows(37, width, dtype, 1)
    w = (1 + 0.1 * rows(1, width, torch.float32, 2)[0]).to(dtype)
    for residual, alpha, beta in ((None, 1.0, 1.0), (r, 2.378414230005442, 1.0), (r, 1.0, 0.6)):
        y0, h0 = torch_residual_rms_norm(x, w, 1e-5, residual, alpha, beta)
        y1, h1 = residual_rms_norm(x, w, 1e-5, residual, alpha, beta, backend="triton")
        assert y1.dtype == h1.dtype == dtype
        torch.testing.assert_close(y1, y0, rtol=0, atol=0)  # the residual rounds like torch
        if dtype == torch.float32:
            torch.testing.assert_close(h1, h0, rtol=1e-5, atol=1e-5)
        else:  # only the order of the fp32 sum of squares differs: at most one ulp
            assert ((h1.float() - h0.float()).abs() <= h0.float().abs() * ULP[dtype] + 1e-6).all()
            assert (h1 == h0).float().mean() > 0.97
    # the twin is the model's code
    y, h = torch_residual_rms_norm(x, w, 1e-5, r, 2.0, 0.5)
    torch.testing.assert_close(h, rms_norm(2.0 * r + 0.5 * x, w, 1e-5), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", HALF)
def test_gated_rms_norm_matches_the_lightning_tail(dtype):
    o, gate = rows(29, 128, dtype, 3), rows(29, 128, dtype, 4)
    w = (1 + 0.1 * rows(1, 128, torch.float32, 5)[0]).to(dtype)
    ref = torch.sigmoid(gate) * rms_norm(o, w, 1e-6)  # LightningAttention.forward's tail
    torch.testing.assert_close(torch_gated_rms_norm(o, gate, w, 1e-6), ref, rtol=0, atol=0)
    out = gated_rms_norm(o, gate, w, 1e-6, backend="triton")
    assert out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    else:
        assert ((out.float() - ref.float()).abs() <= ref.float().abs() * 2 * ULP[dtype]
                + 1e-6).all()
        assert (out == ref).float().mean() > 0.97


def test_fused_norms_refuse_bad_shapes_and_take_no_rows():
    x = torch.ones(3, 8)
    with pytest.raises(ValueError, match="residual_rms_norm takes"):
        residual_rms_norm(x, torch.ones(5), 1e-6)
    with pytest.raises(ValueError, match="gated_rms_norm takes"):
        gated_rms_norm(x, x[:, :4], torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="unknown fused norm backend"):
        gated_rms_norm(x, x, torch.ones(8), 1e-6, backend="cuda")
    empty = torch.ones(0, 8)
    assert gated_rms_norm(empty, empty, torch.ones(8), 1e-6, backend="triton").shape == (0, 8)
    y, h = residual_rms_norm(empty, torch.ones(8), 1e-6, empty, backend="triton")
    assert y.shape == h.shape == (0, 8)
