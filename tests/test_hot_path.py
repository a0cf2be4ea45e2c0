"""The train hot path's elementwise savings (issue 16) keep the numbers: the fused-normalisation
RMSNorm equals the official formula, and a pre-norm layer (every residual scale 1) launches no
multiplications by 1 yet computes the same output and gradients."""

import torch
from torch.profiler import ProfilerActivity, profile

from minimax01 import ModelConfig
from minimax01.config import LINEAR
from minimax01.model.layers import AttnContext, DecoderLayer
from minimax01.ops.norm import rms_norm


def _official(x, weight, eps):
    xf = x if x.dtype == torch.float64 else x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def test_rms_norm_equals_the_official_formula_and_its_gradient():
    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-12), (torch.bfloat16, 1e-2)):
        x = (torch.randn(3, 5, 64) * 4).to(dtype).requires_grad_()
        w = torch.randn(64, dtype=torch.float32 if dtype == torch.bfloat16 else dtype,
                        requires_grad=True)
        y, ref = rms_norm(x, w, 1e-6), _official(x, w, 1e-6)
        assert y.dtype == x.dtype  # bf16 x, fp32 weight: bf16 (the official code promotes)
        torch.testing.assert_close(y, ref.to(x.dtype), rtol=tol, atol=tol)
        g = torch.randn_like(y)
        gx, gw = torch.autograd.grad(y, (x, w), g)
        rx, rw = torch.autograd.grad(ref, (x, w), g.to(ref.dtype))
        torch.testing.assert_close(gx, rx, rtol=tol * 10, atol=tol * 10)
        torch.testing.assert_close(gw, rw, rtol=tol * 10, atol=tol * 10)


def _layer(alpha):
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, intermediate_size=48, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, rotary_dim=8, num_local_experts=4,
                      num_experts_per_tok=2, block_size=16, vocab_size=64, num_hidden_layers=1,
                      layer_types=[LINEAR], linear_attn_alpha=alpha, mlp_alpha=alpha,
                      postnorm=False)
    return DecoderLayer(cfg, 0)


def _muls(layer, x):
    """Multiplications of a residual-shaped tensor by a scalar in one forward."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        layer(x, AttnContext())
    return sum(1 for e in prof.events() if e.name == "aten::mul"
               and e.input_shapes[:2] == [list(x.shape), []])


def test_pre_norm_layer_skips_unit_residual_scales_with_equal_results():
    x = torch.randn(1, 24, 32, requires_grad=True)
    layer = _layer(1.0)
    out, _ = layer(x, AttnContext())
    # the same layer written out with the unit scales
    h1 = layer.input_layernorm(x)
    y = 1.0 * x + 1.0 * layer.self_attn(h1, AttnContext())
    moe, _ = layer.mlp(layer.post_attention_layernorm(y))
    ref = 1.0 * y + 1.0 * moe
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    assert torch.equal(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0])
    # scales of 1 launch nothing; any other scale still multiplies 
    assert _muls(_layer(1.5), x) - _muls(layer, x) == 2  # the two alphas; betas stay 1
