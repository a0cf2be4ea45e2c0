"""The flash prefill path (ops/prefill_attention): the K/V gather from the slot and the paged
layout against a plain loop (odd lengths, ctx = 0, several documents, shared pages, repeated GQA
heads); the whole path on the CPU, with a torch stand-in for varlen_attn, against the slot and
paged attention twins, and wired into the engine; on the GPU, the real varlen_attn in bf16
against the twin (bottom-right causal alignment checked) and engine greedy tokens flash vs
Triton prefill."""

import random

import pytest
import torch

from minimax01.infer import slot_cache
from minimax01.infer.pool import PagePool
from minimax01.ops import prefill_attention as pa
from minimax01.ops.paged_attention import torch_paged_attention, write_kv
from minimax01.ops.slot_attention import torch_slot_attention

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _slot_case(g, s=4, hkv=2, length=40, d=8, h=4, dtype=torch.float32, device="cpu"):
    keys = torch.randn(s, hkv, length, d, generator=g).to(device, dtype)
    values = torch.randn(s, hkv, length, d, generator=g).to(device, dtype)
    slot, ctx, qlen = [3, 0, 2, 1], [0, 17, 5, 30], [9, 1, 18, 0]  # an empty document too
    q = torch.randn(sum(qlen), h, d, generator=g).to(device, dtype)
    return q, keys, values, slot, ctx, qlen


def _paged_case(seed, ctx, qlen, page_size=4, hkv=2, h=4, d=8, shared=2, dtype=torch.float32):
    """Documents with ctx[n] + qlen[n] tokens in interleaved pages of one pool, the first
    `shared` pages common to all (a shared prefix). Returns q, pages, the block table."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    lengths = [c + n for c, n in zip(ctx, qlen)]
    pool = PagePool(num_pages=sum(lengths) // page_size + 3 * len(lengths) + shared + 4,
                    page_size=page_size)
    kp = torch.randn(pool.num_pages, hkv, page_size, d, generator=g).to(dtype)
    vp = torch.randn(pool.num_pages, hkv, page_size, d, generator=g).to(dtype)
    prefix = shared * page_size
    pool.allocate("prefix", prefix)
    grown = [prefix] * len(lengths)
    for n in range(len(lengths)):
        pool.allocate(n, prefix, prefix=pool.pages("prefix"))
    while any(a < b for a, b in zip(grown, lengths)):  # random growth: pages interleave
        n = rng.choice([i for i in range(len(lengths)) if grown[i] < lengths[i]])
        grown[n] = min(lengths[n], grown[n] + rng.randrange(1, 2 * page_size))
        pool.extend(n, grown[n])
    for n, length in enumerate(lengths):  # each document's own tokens after the shared prefix
        k = torch.randn(length - prefix, hkv, d, generator=g).to(dtype)
        write_kv(kp, vp, k, -k, pool.slot_mapping(n, prefix, length))
    table = pool.block_table(range(len(lengths)), width=max(map(pool.pages_needed, lengths)) + 1)
    q = torch.randn(sum(qlen), h, d, generator=g).to(dtype)
    return q, kp, vp, table.to(torch.int32)


def _i32(x, device="cpu"):
    return torch.tensor(x, dtype=torch.int32, device=device)


@pytest.mark.parametrize("repeat", [False, True])
def test_slot_gather_matches_a_loop(repeat):
    g = torch.Generator().manual_seed(0)
    q, keys, values, slot, ctx, qlen = _slot_case(g)
    p = pa.plan(ctx, qlen, 4, 2, "cpu", slot=torch.tensor(slot), repeat_heads=repeat)
    k, v = pa.gather_kv(keys, values, p.rows, p.cols, p.heads)
    want_k, want_v = [], []
    for s, c, n in zip(slot, ctx, qlen):
        for pos in range(c + n):
            kk, vv = keys[s, :, pos], values[s, :, pos]           # [Hkv, D]
            if repeat:
                kk, vv = kk.repeat_interleave(2, 0), vv.repeat_interleave(2, 0)
            want_k.append(kk)
            want_v.append(vv)
    assert k.shape == (sum(ctx) + sum(qlen), 4 if repeat else 2, 8)
    assert torch.equal(k, torch.stack(want_k)) and torch.equal(v, torch.stack(want_v))
    assert p.cu_q.tolist() == [0, 9, 10, 28, 28] and p.cu_k.tolist() == [0, 9, 27, 50, 80]
    assert (p.max_q, p.max_k) == (18, 30)


def test_paged_gather_matches_a_loop_with_shared_pages():
    ctx, qlen, ps = [8, 21, 13], [5, 1, 10], 4  # every ctx >= the 8-token shared prefix
    q, kp, vp, table = _paged_case(1, ctx, qlen, page_size=ps)
    assert table[0, 0] == table[1, 0] == table[2, 0] != 0   # the shared prefix pages
    p = pa.plan(ctx, qlen, 4, 2, "cpu", block_table=table, page_size=ps, repeat_heads=False)
    k, v = pa.gather_kv(kp, vp, p.rows, p.cols)
    want_k, want_v = [], []
    for n, (c, m) in enumerate(zip(ctx, qlen)):
        for pos in range(c + m):
            want_k.append(kp[table[n, pos // ps], :, pos % ps])
            want_v.append(vp[table[n, pos // ps], :, pos % ps])
    assert torch.equal(k, torch.stack(want_k)) and torch.equal(v, torch.stack(want_v))
    assert torch.equal(v[8:13], -k[8:13])   # document 0's own tokens: v = -k as written


@pytest.fixture
def torch_varlen(monkeypatch):
    """varlen_attn replaced by its torch stand-in; `gqa` picks whether it takes enable_gqa."""
    def use(gqa):
        monkeypatch.setattr(pa, "VARLEN", (pa.torch_varlen_attn, {"window_size": (-1, 0)}, gqa))
    return use


@pytest.mark.parametrize("gqa", [False, True])
def test_flash_path_on_cpu_equals_the_twins(torch_varlen, gqa):
    torch_varlen(gqa)
    g = torch.Generator().manual_seed(2)
    q, keys, values, slot, ctx, qlen = _slot_case(g)
    p = pa.plan(ctx, qlen, 4, 2, "cpu", slot=torch.tensor(slot))
    assert (p.heads is None) == gqa
    out = pa.prefill_attention(q, keys, values, p, 0.3)
    ref = torch_slot_attention(q, keys, values, slot, ctx, qlen, 0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # top-left alignment would be a different function: the test can tell them apart
    k, v = pa.gather_kv(keys, values, p.rows, p.cols)
    top_left = pa.torch_varlen_attn(q, k, v, p.cu_q, p.cu_k, p.max_q, p.max_k, scale=0.3,
                                    enable_gqa=True, bottom_right=False)
    assert (top_left - ref).abs().max() > 0.1
    ctx, qlen = [8, 21, 13, 30], [5, 1, 10, 7]
    q, kp, vp, table = _paged_case(3, ctx, qlen)
    p = pa.plan(ctx, qlen, 4, 2, "cpu", block_table=table, page_size=4)
    out = pa.prefill_attention(q, kp, vp, p, 0.3)
    ref = torch_paged_attention(q, kp, vp, table, ctx, qlen, 0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_flash_supported_only_where_varlen_runs():
    x = torch.empty(2, 4, 128, dtype=torch.bfloat16)
    assert not pa.flash_supported(x, x)                      # CPU: never
    if pa.VARLEN is not None:
        assert isinstance(pa.VARLEN[1], dict) and len(pa.VARLEN[1]) == 1


def test_engine_prefill_through_the_flash_wiring_on_cpu(torch_varlen, monkeypatch):
    # the engine with the flash prefill path (torch stand-in for varlen_attn): the same greedy
    # tokens as the default path, slot and paged pools, prefix-cache hits and chunked prompts
    from test_prefix_cache import GREEDY, outputs, tiny_config, workload
    from minimax01 import MiniMaxForCausalLM
    from minimax01.infer.engine import Engine

    torch_varlen(False)
    torch.manual_seed(0)
    model = MiniMaxForCausalLM(tiny_config()).eval()
    prompts = workload(5, n=4)
    kw = dict(num_slots=2, max_context=160, max_num_batched_tokens=24, prefix_block_size=8)
    want = outputs(Engine(model, **kw), prompts)
    calls = []
    real = pa.prefill_attention
    monkeypatch.setattr(slot_cache, "flash_supported", lambda q, k: True)
    monkeypatch.setattr(slot_cache, "prefill_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    for extra in ({}, dict(kv_page_size=8)):
        calls.clear()
        eng = Engine(model, **kw, **extra)
        assert eng.cache.prefill_flash
        assert outputs(eng, prompts) == want
        assert len(calls) > 0  # the flash wiring ran (2 softmax layers per prefill step)


@pytest.mark.gpu
@cuda
@pytest.mark.skipif(pa.VARLEN is None, reason="this torch has no varlen_attn")
def test_cuda_flash_prefill_bf16_slot_and_paged():
    dev, h, hkv, d = "cuda", 16, 4, 128
    g = torch.Generator().manual_seed(0)
    bf = dict(dtype=torch.bfloat16)
    keys = torch.randn(3, hkv, 4096, d, generator=g).to(dev, **bf)
    values = torch.randn(3, hkv, 4096, d, generator=g).to(dev, **bf)
    slot, ctx, qlen = [2, 0, 1], [0, 3000, 1500], [700, 96, 333]  # qlen < ctx + qlen
    q = torch.randn(sum(qlen), h, d, generator=g).to(dev, **bf)
    assert pa.flash_supported(q, keys)
    p = pa.plan(ctx, qlen, h, hkv, dev, slot=torch.tensor(slot, device=dev))
    out = pa.prefill_attention(q, keys, values, p, d ** -0.5)
    ref = torch_slot_attention(q, keys, values, slot, ctx, qlen, d ** -0.5)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    k, v = pa.gather_kv(keys, values, p.rows, p.cols)
    top_left = pa.torch_varlen_attn(q, k, v, p.cu_q, p.cu_k, p.max_q, p.max_k, scale=d ** -0.5,
                                    enable_gqa=True, bottom_right=False)
    assert (out.float() - top_left.float()).abs().max() > 0.1  # not top-left aligned
    # the step record's form (lengths already on the device): plan + gather never synchronise
    cu_q, kv_len, slot_t = p.cu_q.clone(), p.cu_k.diff(), torch.tensor(slot, device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        p2 = pa.plan(ctx, qlen, h, hkv, dev, slot=slot_t, cu_q=cu_q, kv_len=kv_len)
        pa.gather_kv(keys, values, p2.rows, p2.cols, p2.heads)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ctx, qlen = [2048, 3000, 17], [700, 96, 300]
    q, kp, vp, table = _paged_case(4, ctx, qlen, page_size=16, hkv=hkv, h=h, d=d, shared=8,
                                   dtype=torch.bfloat16)
    q, kp, vp, table = (x.to(dev) for x in (q, kp, vp, table))
    p = pa.plan(ctx, qlen, h, hkv, dev, block_table=table, page_size=16)
    out = pa.prefill_attention(q, kp, vp, p, d ** -0.5)
    ref = torch_paged_attention(q, kp, vp, table, ctx, qlen, d ** -0.5)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


def _same_or_tied(a, b, tol=0.05):
    """Greedy tokens of two runs agree up to the first place they part, where both picks must be
    a near tie (log-probs within tol): bf16 rounding may flip a tie, nothing else."""
    for x, y in zip(a.logprobs, b.logprobs):
        if x.token != y.token:
            return abs(x.logprob - y.logprob) < tol
    return a.token_ids == b.token_ids


@pytest.mark.gpu
@cuda
@pytest.mark.skipif(pa.VARLEN is None, reason="this torch has no varlen_attn")
@pytest.mark.parametrize("page_size", [None, 16])
def test_cuda_engine_flash_prefill_equals_triton(page_size):
    from test_engine import random_prompts
    from minimax01 import MiniMaxForCausalLM, ModelConfig
    from minimax01.infer.engine import Engine, cast_model
    from minimax01.infer.request import SamplingParams

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug", num_key_value_heads=1, head_dim=32, rotary_dim=16)
    with torch.device("cuda"):
        m = cast_model(MiniMaxForCausalLM(cfg).eval(), dtype=torch.bfloat16)
    prompts = random_prompts([3, 200, 17, 90, 1, 64, 260], seed=6)
    params = SamplingParams(max_tokens=12, logprobs=0, temperature=0.0, ignore_eos=True)
    runs = {}
    for flash in (True, False):
        eng = Engine(m, num_slots=4, max_context=300, prefill_chunk=128, kv_page_size=page_size)
        assert eng.cache.prefill_flash and eng.cache.attention == "triton"
        eng.cache.prefill_flash = flash
        runs[flash] = eng.generate(prompts, params)
    assert all(_same_or_tied(a, b) for a, b in zip(runs[True], runs[False]))
    same = sum(a.token_ids == b.token_ids for a, b in zip(runs[True], runs[False]))
    assert same >= len(prompts) - 1, same
