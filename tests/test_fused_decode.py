"""Fused lightning decode (ops/decode, infer/fused_decode.py): the Triton kernels (interpreted on
the CPU) against their torch twin, and a whole model decode step with fused lightning layers
against the model's unfused step (logits and every state row); when the engine may use it."""

import pytest
import torch

from minimax01 import ModelConfig, MiniMaxForCausalLM
from minimax01.config import LINEAR
from minimax01.infer.fused_decode import fused, fused_decode_supported
from minimax01.infer.slot_cache import SlotCache, SlotPool
from minimax01.model.layers import Experts
from minimax01.ops.decode import (MOE_MAX_TOKENS, lightning_decode_gated, moe_decode,
                                  residual_rms_norm, torch_lightning_decode_gated,
                                  torch_moe_decode, torch_residual_rms_norm,
                                  triton_lightning_decode_gated, triton_moe_decode,
                                  triton_residual_rms_norm)
from minimax01.ops.moe import TRAINING, moe_pipeline, route
from minimax01.ops.lightning import lightning_slopes
from minimax01.parallel.config import ParallelConfig

pytest.importorskip("triton")


def _inputs(b, h, d, n, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, h * 3 * d, generator=g)
    gate = torch.randn(b, h * d, generator=g)
    state = torch.randn(n, h, d, d, generator=g) * 0.1
    w = 1 + 0.1 * torch.randn(h * d, generator=g)
    to = dict(device=device)
    return (qkv.to(dtype=dtype, **to), gate.to(dtype=dtype, **to), state.to(**to),
            lightning_slopes(h, 1, 4).to(**to), w.to(dtype=dtype, **to))


@pytest.mark.parametrize("d", [16, 24])
def test_triton_matches_twin_with_slots_and_padding_rows(d):
    b, h, n = 3, 4, 6
    qkv, gate, state, slope, w = _inputs(b, h, d, n, seed=d)
    slots = torch.tensor([4, 0, 2])
    valid = torch.tensor([True, False, True])
    s_ref, s_tri = state.clone(), state.clone()
    ref = torch_lightning_decode_gated(qkv, gate, s_ref, slope, w, 1e-5, slots, valid)
    out = triton_lightning_decode_gated(qkv, gate, s_tri, slope, w, 1e-5, slots, valid)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_tri, s_ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(s_tri[[1, 3, 5]], state[[1, 3, 5]])       # rows not named: untouched
    lam = torch.exp(-slope)[:, None, None]
    torch.testing.assert_close(s_tri[0], lam * state[0])          # padding row: decay only
    assert not torch.allclose(s_tri[4], lam * state[4])           # a real row: k^T v added
    # without slots: rows 0..B-1
    s2 = state[:b].clone()
    out2 = lightning_decode_gated(qkv, gate, s2, slope, w, 1e-5, backend="triton")
    s3 = state[:b].clone()
    torch.testing.assert_close(out2, lightning_decode_gated(qkv, gate, s3, slope, w, 1e-5),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("postnorm_residual", [False, True])
def test_residual_norm_matches_twin(postnorm_residual):
    g = torch.Generator().manual_seed(5)
    x, r = torch.randn(3, 40, generator=g), torch.randn(3, 40, generator=g)
    w = torch.rand(40, generator=g) + 0.5
    res = r if postnorm_residual else None
    y0, h0 = torch_residual_rms_norm(x, w, 1e-6, res, 1.7, 0.3)
    y1, h1 = triton_residual_rms_norm(x, w, 1e-6, res, 1.7, 0.3)
    torch.testing.assert_close(y1, y0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(h1, h0, atol=1e-5, rtol=1e-5)
    if res is None:
        assert y1 is x
    else:
        torch.testing.assert_close(y0, 1.7 * r + 0.3 * x)
    torch.testing.assert_close(h0, w * y0 / y0.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt())
    with pytest.raises(ValueError, match="residual_rms_norm takes"):
        residual_rms_norm(x, w[:5], 1e-6)


def test_small_batch_moe_matches_twin_and_the_moe_pipeline():
    g = torch.Generator().manual_seed(6)
    n, h, i, e, k = 3, 48, 40, 6, 2
    x, logits = torch.randn(n, h, generator=g), torch.randn(n, e, generator=g)
    cfg = ModelConfig.from_preset("debug", hidden_size=h, intermediate_size=i,
                                  num_local_experts=e, num_experts_per_tok=k)
    experts = Experts(cfg)
    gu, dn = experts.gate_up_proj.detach(), experts.down_proj.detach()
    with torch.no_grad():
        ref, _, _ = moe_pipeline(x, route(logits, k), experts, TRAINING)
    twin = torch_moe_decode(x, logits, gu, dn, k)
    out = triton_moe_decode(x, logits, gu, dn, k)
    torch.testing.assert_close(twin, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # the routing matters: another expert order gives another result
    assert not torch.allclose(triton_moe_decode(x, logits.flip(1), gu, dn, k), ref, atol=1e-3)
    with pytest.raises(ValueError, match="at most 4 tokens"):
        moe_decode(torch.randn(MOE_MAX_TOKENS + 1, h), torch.randn(MOE_MAX_TOKENS + 1, e), gu,
                   dn, k)
    with pytest.raises(ValueError, match="do not fit together"):
        moe_decode(x, logits[:, :4], gu, dn, k)


def test_bad_inputs_get_one_clear_line():
    qkv, gate, state, slope, w = _inputs(2, 4, 16, 2, seed=0)
    with pytest.raises(ValueError, match="qkv must be"):
        lightning_decode_gated(qkv[:, :-1], gate, state, slope, w, 1e-5)
    with pytest.raises(ValueError, match="gate must be"):
        lightning_decode_gated(qkv, gate[:, :8], state, slope, w, 1e-5)
    with pytest.raises(ValueError, match="state must be fp32"):
        lightning_decode_gated(qkv, gate, state.double(), slope, w, 1e-5)
    with pytest.raises(ValueError, match="B=2 rows"):
        lightning_decode_gated(qkv, gate, state[:1], slope, w, 1e-5)
    with pytest.raises(ValueError, match="unknown fused decode backend"):
        lightning_decode_gated(qkv, gate, state, slope, w, 1e-5, backend="cuda")


def _decode_both(model, backend, rows=4):
    """One decode step of `rows` rows (the last a padding row) with the unfused and the fused
    record, each on its own copy of the same pool. Returns (logits, states) of each."""
    cfg = model.config
    pool = SlotPool(cfg, num_slots=rows, max_context=64)
    cache = SlotCache(pool, attention="torch")
    cache.decode_backend = backend
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        prompts = [7, 1, 12, 3, 9][:rows - 1]
        slots_list = [2, 0, 3, 1, 4][:rows - 1]
        pre = cache.begin_prefill(slots_list, [0] * len(prompts), prompts)
        model(torch.randint(0, cfg.vocab_size, (1, sum(prompts)), generator=g),
              cu_seqlens=pre.cu_seqlens, cache=pre)
        tokens = torch.randint(0, cfg.vocab_size, (rows, 1), generator=g)
        slots = torch.tensor(slots_list + [pool.scratch])
        active = torch.tensor([True] * (rows - 1) + [False])
        lengths = prompts + [0]
        saved = ({i: s.clone() for i, s in pool.states.items()},
                 {i: k.clone() for i, k in pool.keys.items()}, pool.lengths.clone())
        results = []
        for wrap in (lambda s: s, fused):
            for i, s in saved[0].items():
                pool.states[i].copy_(s)
            for i, k in saved[1].items():
                pool.keys[i].copy_(k)
            pool.lengths.copy_(saved[2])
            step = wrap(cache.begin_decode(slots, active, lengths))
            logits = model(tokens, cache=step).logits
            results.append((logits, {i: s.clone() for i, s in pool.states.items()}))
    return results


@pytest.mark.parametrize("backend,rows", [("torch", 4), ("triton", 4), ("triton", 6)])
def test_model_decode_step_fused_equals_unfused(backend, rows, monkeypatch):
    torch.manual_seed(0)
    model = MiniMaxForCausalLM(ModelConfig.from_preset("debug")).eval()
    with torch.no_grad():  # norm weights away from their init of ones, so they count
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    calls, norms, moes = [], [], []  # the fused ops really ran, with this backend

    def spy(*args, **kw):
        calls.append(kw["backend"])
        return lightning_decode_gated(*args, **kw)

    def spy_norm(*args, **kw):
        norms.append(kw["backend"])
        return residual_rms_norm(*args, **kw)

    monkeypatch.setattr("minimax01.infer.fused_decode.lightning_decode_gated", spy)
    monkeypatch.setattr("minimax01.infer.fused_decode.residual_rms_norm", spy_norm)
    monkeypatch.setattr("minimax01.infer.fused_decode.moe_decode",
                        lambda *a, **kw: moes.append(kw["backend"]) or moe_decode(*a, **kw))
    (l0, s0), (l1, s1) = _decode_both(model, backend, rows)
    torch.testing.assert_close(l1[:rows - 1], l0[:rows - 1], atol=2e-5, rtol=2e-5)
    assert s0.keys() == s1.keys() and s0
    for i in s0:  # every row but the scratch one
        torch.testing.assert_close(s1[i][:rows], s0[i][:rows], atol=1e-6, rtol=1e-6)
    assert calls == [backend] * len(s0)
    assert norms == [backend] * 2 * model.config.num_hidden_layers
    # up to MOE_MAX_TOKENS rows: the small-batch MoE; more: the MoE block itself
    assert moes == [backend] * model.config.num_hidden_layers * (rows <= MOE_MAX_TOKENS)
    assert len(s0) == sum(t == LINEAR for t in model.config.layer_types)


def test_when_the_engine_may_fuse():
    cfg = ModelConfig.from_preset("debug")
    assert fused_decode_supported(cfg) and fused_decode_supported(cfg, 1)
    assert not fused_decode_supported(cfg, 2)                    # tensor parallel
    assert not fused_decode_supported(cfg, ParallelConfig(ep=2))  # expert parallel
    assert fused_decode_supported(cfg, ParallelConfig())
    softmax_only = ModelConfig.from_preset("debug", layer_types=["full_attention"] * 4)
    assert not fused_decode_supported(softmax_only)
    with pytest.raises(TypeError, match="parallel must be"):
        fused_decode_supported(cfg, "tp2")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("b", [1, 64])
def test_cuda_fused_decode_bf16(b):
    h, d, n = 16, 128, 80
    qkv, gate, state, slope, w = _inputs(b, h, d, n, seed=b, dtype=torch.bfloat16, device="cuda")
    slots = torch.randperm(n, device="cuda")[:b]
    s_ref, s_tri = state.clone(), state.clone()
    ref = torch_lightning_decode_gated(qkv, gate, s_ref, slope, w, 1e-5, slots)
    out = triton_lightning_decode_gated(qkv, gate, s_tri, slope, w, 1e-5, slots)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(s_tri, s_ref, atol=1e-5, rtol=1e-5)
    x, r = gate, gate.flip(0)
    y0, h0 = torch_residual_rms_norm(x, w, 1e-5, r, 1.5, 0.7)
    y1, h1 = triton_residual_rms_norm(x, w, 1e-5, r, 1.5, 0.7)
    torch.testing.assert_close(y1.float(), y0.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(h1.float(), h0.float(), atol=5e-2, rtol=2e-2)
    if b <= MOE_MAX_TOKENS:
        gu = torch.randn(8, 2 * 768, 2048, device="cuda", dtype=torch.bfloat16) * 0.02
        dn = torch.randn(8, 2048, 768, device="cuda", dtype=torch.bfloat16) * 0.04
        x, logits = gate[:, :2048].contiguous(), gate[:, :8].contiguous()
        torch.testing.assert_close(triton_moe_decode(x, logits, gu, dn, 2).float(),
                                   torch_moe_decode(x, logits, gu, dn, 2).float(),
                                   atol=2e-2, rtol=2e-2)
