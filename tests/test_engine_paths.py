"""The engine's alternative decode and cache paths give the same greedy tokens as the default
ones: fused small-batch decode kernels (infer/fused_decode.py, their torch twins on the CPU)."""

import pytest
import torch

from test_prefix_cache import GREEDY, outputs, tiny_config, workload
from minimax01 import MiniMaxForCausalLM
from minimax01.infer.engine import Engine
from minimax01.infer.fused_decode import FusedDecodeStep


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MiniMaxForCausalLM(tiny_config()).eval()


def test_fused_decode_equals_unfused(model):
    prompts = workload(11, n=5)
    kw = dict(num_slots=3, max_context=256, max_num_batched_tokens=32, prefix_block_size=8)
    want = outputs(Engine(model, fused_decode=False, **kw), prompts)
    eng = Engine(model, fused_decode=True, **kw)
    slot_idx = torch.tensor([0]), torch.tensor([True])
    assert isinstance(eng.cache.begin_decode(*slot_idx, [0]), FusedDecodeStep)
    assert outputs(eng, prompts) == want


@pytest.mark.parametrize("prefix", [False, True])
def test_paged_kv_equals_slots_and_preempts_when_pages_run_out(model, prefix):
    # paged K/V (infer/pool.py, ops/paged_attention torch twin): the same tokens as the slot
    # pool; with only enough pages for about two sequences, four slots must preempt, and the
    # recomputed sequences still give the same tokens
    prompts = workload(12, n=7)
    params = GREEDY.__class__(max_tokens=10, temperature=0.0, ignore_eos=True)
    kw = dict(num_slots=4, max_context=192, max_num_batched_tokens=24, prefix_cache=prefix,
              prefix_block_size=8)
    want = outputs(Engine(model, **kw), prompts, params)
    roomy = Engine(model, kv_page_size=8, **kw)
    assert roomy.pool.pages.capacity == 4 * 192 // 8
    assert outputs(roomy, prompts, params) == want
    need = max(len(p) for p in prompts) + 10
    tight = Engine(model, kv_page_size=8, kv_pages=2 * (need // 8 + 1) + 1, **kw)
    assert outputs(tight, prompts, params) == want
    assert tight.scheduler.num_preemptions > 0
    tight.pool.pages.check()
    assert tight.pool.pages.free_pages == tight.pool.pages.capacity  # every page back
    # a request longer than all pages together is refused up front, naming the limit
    with pytest.raises(ValueError, match=f"context limit of {tight.pool.max_sequence_tokens}"):
        tight.add_request([1] * (tight.pool.max_sequence_tokens + 1), params)


def test_paged_engine_through_the_triton_kernels(monkeypatch):
    # the engine's Triton paths (interpreted on the CPU): paged attention in prefill and decode
    # with block tables, under preemption and prefix-cache hits, against the torch slot pool
    pytest.importorskip("triton")
    from minimax01 import ModelConfig
    from minimax01.config import hybrid_layer_types

    cfg = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, rotary_dim=8,
                      layer_types=hybrid_layer_types(2, 2), num_local_experts=2,
                      num_experts_per_tok=1, block_size=8, dtype="float32",
                      rope_theta=10_000.0)
    torch.manual_seed(0)
    m = MiniMaxForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    ps = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (12, 7, 20)]
    ps.append(ps[2] + [5, 6, 7])
    params = GREEDY.__class__(max_tokens=8, temperature=0.0, ignore_eos=True)
    kw = dict(num_slots=2, max_context=64, max_num_batched_tokens=16, prefix_block_size=8)
    want = outputs(Engine(m, prefix_cache=False, **kw), ps, params)
    eng = Engine(m, kv_page_size=8, kv_pages=5, **kw)  # 32 tokens for both slots
    eng.cache.attention = "triton"
    assert outputs(eng, ps, params) == want
    assert eng.scheduler.num_preemptions > 0 and eng.prefix_cache.stats["hit_tokens"] > 0
