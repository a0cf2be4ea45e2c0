"""Prefix caching (infer/prefix_cache.py): greedy outputs with the cache equal those without it,
over random prefix-sharing workloads, concurrent requests, eviction under a tiny budget, slot
reuse, and prefill chunks whose boundaries do not line up with cache blocks; the policy's
bookkeeping (exact keys, LRU over leaves, budget) and the server's usage field."""

import json
import random

import pytest
import torch

from minimax01 import ModelConfig, MiniMaxForCausalLM
from minimax01.config import hybrid_layer_types
from minimax01.infer.engine import Engine
from minimax01.infer.prefix_cache import PrefixCache
from minimax01.infer.request import SamplingParams
from minimax01.infer.slot_cache import SlotPool

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def tiny_config() -> ModelConfig:
    """Two lightning and two softmax layers, as small as they come (the tests run many steps)."""
    return ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=16, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, rotary_dim=4,
                       layer_types=hybrid_layer_types(4, 2), num_local_experts=4,
                       num_experts_per_tok=2, block_size=8, dtype="float32",
                       rope_theta=10_000.0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MiniMaxForCausalLM(tiny_config()).eval()


def workload(seed, n=10):
    """Conversations that share system prompts and earlier turns, plus unrelated prompts."""
    rng = random.Random(seed)
    systems = [[rng.randrange(256) for _ in range(rng.randint(20, 60))] for _ in range(2)]
    prompts = []
    for _ in range(n):
        if rng.random() < 0.2:
            prompts.append([rng.randrange(256) for _ in range(rng.randint(1, 40))])
            continue
        base = list(rng.choice(systems))
        if prompts and rng.random() < 0.5:  # the next turn of an earlier conversation
            base = list(rng.choice(prompts))
        prompts.append(base + [rng.randrange(256) for _ in range(rng.randint(1, 30))])
    return prompts


def outputs(engine, prompts, params=GREEDY):
    return [o.token_ids for o in engine.generate(prompts, params)]


@pytest.mark.parametrize("seed,block,chunk,slots", [(1, 8, 13, 3), (2, 16, 40, 2), (3, 4, 7, 4)])
def test_cache_on_equals_cache_off(model, seed, block, chunk, slots):
    # chunk sizes that are not multiples of the block size; concurrent requests (several slots);
    # more requests than slots (slot reuse); each workload twice (the second pass hits)
    prompts = workload(seed)
    off = Engine(model, num_slots=slots, max_context=256, max_num_batched_tokens=chunk,
                 prefix_cache=False)
    want = outputs(off, prompts)
    on = Engine(model, num_slots=slots, max_context=256, max_num_batched_tokens=chunk,
                prefix_block_size=block)
    assert outputs(on, prompts) == want
    first = on.prefix_cache.stats["hit_tokens"]
    assert outputs(on, prompts) == want
    stats = on.prefix_cache.stats
    assert stats["hit_tokens"] > first > 0  # shared prefixes hit within and across passes
    assert on.pool.free_slots == slots
    # every hit is a multiple of the block size and leaves at least one token to run
    assert stats["hit_tokens"] % block == 0


def test_eviction_under_a_tiny_budget(model):
    prompts = workload(4, n=12)
    want = outputs(Engine(model, num_slots=2, max_context=256, max_num_batched_tokens=16,
                          prefix_cache=False), prompts)
    eng = Engine(model, num_slots=2, max_context=256, max_num_batched_tokens=16,
                 prefix_block_size=8)
    cache = eng.prefix_cache
    cache.budget_bytes = 3 * cache.kv_bytes + 2 * cache.state_bytes  # a handful of blocks
    assert outputs(eng, prompts) == want
    assert outputs(eng, prompts[::-1]) == want[::-1]
    assert cache.stats["evicted_nodes"] > 0 and cache.stats["hits"] > 0
    assert cache.used_bytes <= cache.budget_bytes
    # the store holds exactly the policy's nodes
    store = eng.prefix_store
    assert set(store.kv) == {n.id for n in cache.nodes.values()}
    assert set(store.states) == {n.id for n in cache.nodes.values() if n.has_state}
    assert store.memory_bytes() == cache.used_bytes


def test_hit_resumes_mid_prompt_and_reports_cached_tokens(model):
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(0, 256, (40,), generator=g).tolist()
    a, b = shared + [1, 2, 3], shared + [9, 8, 7, 6]
    off = Engine(model, num_slots=1, max_context=128, prefix_cache=False)
    want = outputs(off, [a, b])
    eng = Engine(model, num_slots=1, max_context=128, max_num_batched_tokens=64,
                 prefix_block_size=16)
    rid = eng.add_request(a, GREEDY)
    outs = []
    while eng.has_work():
        outs += [o for o in eng.step() if o.request_id == rid]
    assert [t for o in outs for t in o.token_ids] == want[0]
    assert outs[-1].cached_tokens == 0
    rid = eng.add_request(b, GREEDY)
    outs = []
    while eng.has_work():
        outs += [o for o in eng.step() if o.request_id == rid]
    assert [t for o in outs for t in o.token_ids] == want[1]
    assert outs[-1].cached_tokens == 32  # 40 shared tokens, blocks of 16
    # the identical prompt again: everything but the last block-aligned remainder
    assert outputs(eng, [b]) == [want[1]]


def test_policy_keys_lru_and_budget():
    pool = SlotPool(tiny_config(), 2, 64)
    cache = PrefixCache(pool, block_size=4, budget_bytes=1 << 30)
    x = list(range(12))
    assert cache.load(x, 0) == 0
    cache.save(x, 8, 0)  # blocks 0, 1 with a resume point at 8
    loads, ops = cache.take_ops()
    assert loads == [] and ops[3::4] == [1, 1, 2] and len(cache.nodes) == 2
    assert cache.load(x, 1) == 8
    assert cache.load(x[:8], 1) == 4 or cache.load(x[:8], 1) == 0  # at most len - 1 tokens
    assert cache.load(x[:9], 1) == 8
    y = x[:4] + [99, 5, 6, 7, 8]  # differs inside block 1: only block 0 matches (no state there)
    assert cache.load(y, 1) == 0
    cache.save(y, 4, 1)  # a resume point at 4 on the shared node
    assert cache.load(y, 1) == 4
    # budget for the current nodes only: a new chain evicts least recently used leaves
    cache.take_ops()
    cache.budget_bytes = cache.used_bytes
    z = [50 + i for i in range(8)]
    cache.save(z, 4, 0)
    assert cache.used_bytes <= cache.budget_bytes and cache.stats["evicted_nodes"] >= 1
    assert cache.load(z, 0) == 4
    _, ops = cache.take_ops()
    assert 0 in ops[3::4]  # a drop went out to the stores
    with pytest.raises(ValueError, match="multiples of 4"):
        cache.save(z, 6, 0)


def test_server_usage_reports_cached_tokens(model):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    from server_utils import running, sse_data

    from minimax01.infer.server import create_app
    from minimax01.tokenizer import ByteTokenizer

    eng = Engine(model, ByteTokenizer(), num_slots=2, max_context=256, prefix_block_size=16)
    with running(create_app(eng, ByteTokenizer(), model_name="m")) as url:
        body = {"model": "m", "prompt": "x" * 70, "max_tokens": 2, "temperature": 0}
        first = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
        assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        again = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 64
        assert again["choices"][0]["text"] == first["choices"][0]["text"]
        chat = {"model": "m", "messages": [{"role": "user", "content": "y" * 80}],
                "max_tokens": 2, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        for _ in range(2):
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=chat, timeout=60) as r:
                events = [json.loads(d) for d in sse_data(r.iter_lines()) if d != "[DONE]"]
        usage = events[-1]["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] >= 64
        health = httpx.get(f"{url}/health").json()
        assert health["prefix_cache"]["hits"] >= 2
