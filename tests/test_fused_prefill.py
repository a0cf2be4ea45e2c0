"""infer/fused_prefill.py: the serving prefill with its norms fused (ops/fused_norm kernels,
interpreted on the CPU) gives the unfused prefill's logits and cache, and the engine's greedy
tokens stay generate()'s."""

import pytest
import torch

from minimax01 import MiniMaxForCausalLM, ModelConfig, generate
from minimax01.infer import fused_prefill as fp
from minimax01.infer.engine import Engine
from minimax01.infer.prepare import prepare_for_serving
from minimax01.infer.request import SamplingParams
from minimax01.infer.slot_cache import SlotCache, SlotPool

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MiniMaxForCausalLM(ModelConfig.from_preset("debug")).eval()


def run_prefill(model, wrap, calls=None):
    pool = SlotPool(model.config, 3, 64)
    cache = SlotCache(pool, wrap_prefill=wrap)
    g = torch.Generator().manual_seed(3)
    logits = []
    for starts, lengths in (([0, 0], [9, 5]), ([9, 5], [4, 7])):  # the second continues
        ids = torch.randint(0, 512, (sum(lengths),), generator=g).tolist()
        step = cache.begin_prefill([0, 2], starts, lengths, tokens=ids,
                                   keep=[lengths[0] - 1, sum(lengths) - 1])
        assert isinstance(step, fp.FusedPrefillStep) == (wrap is not None)
        logits.append(model(step.input_ids, cu_seqlens=step.cu_seqlens, cache=step,
                            logits_to_keep=step.keep).logits)
    return torch.cat(logits), pool


@torch.inference_mode()
def test_fused_prefill_matches_the_unfused_prefill(model, monkeypatch):
    restore = prepare_for_serving(model, sync_free=True)
    try:
        ref, ref_pool = run_prefill(model, None)
        seen = []
        for name in ("residual_rms_norm", "gated_rms_norm"):  # the Triton kernels, interpreted
            real = getattr(fp, name)

            def spy(*args, _real=real, _name=name, **kw):
                seen.append(_name)
                return _real(*args, **{**kw, "backend": "triton"})
            monkeypatch.setattr(fp, name, spy)
        out, pool = run_prefill(model, fp.fused_prefill)
    finally:
        restore()
    layers = model.config.num_hidden_layers
    lightning = model.config.layer_types.count("linear_attention")
    assert seen.count("residual_rms_norm") == 2 * 2 * layers  # two forwards, two per layer
    assert seen.count("gated_rms_norm") == 2 * lightning
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for i in ref_pool.states:
        torch.testing.assert_close(pool.states[i], ref_pool.states[i], rtol=1e-5, atol=1e-6)
    for i in ref_pool.keys:
        n = 13  # slot 0 holds 9 + 4 tokens
        torch.testing.assert_close(pool.keys[i][0, :, :n], ref_pool.keys[i][0, :, :n],
                                   rtol=1e-5, atol=1e-6)


def test_engine_with_fused_prefill_equals_generate(model, monkeypatch):
    monkeypatch.setattr(fp.FusedPrefillStep, "_backend", lambda self: "triton")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (7, 30, 3)]
    ref = generate(model, prompts, max_new_tokens=4)[:, -4:].tolist()
    eng = Engine(model, num_slots=2, max_context=64, max_num_batched_tokens=16,
                 fused_prefill=True)
    assert eng.cache.wrap_prefill is fp.fused_prefill
    out = eng.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    eng.close()
    assert [c.token_ids for c in out] == ref
    assert Engine(model, num_slots=1, max_context=8).cache.wrap_prefill is None  # CPU default


def test_folding_decodes_into_the_prefill_keeps_greedy_tokens(model):
    # decode rows as one-token documents of the packed prefill on mixed steps (fp32, CPU)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 40, 1, 70, 13, 9)]
    ref = generate(model, prompts, max_new_tokens=8)[:, -8:].tolist()
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    eng = Engine(model, num_slots=3, max_context=128, max_num_batched_tokens=16,
                 fold_decodes=True)
    folded = []
    real = eng._prefill

    def spy(record, extras=None):
        folded.append(sum(n == 1 for n in record.prefill_lengths))
        return real(record, extras)
    eng._prefill = spy
    out = eng.generate(prompts, params)
    eng.close()
    assert [c.token_ids for c in out] == ref
    assert max(folded) >= 2  # some steps carried decode rows inside the prefill
