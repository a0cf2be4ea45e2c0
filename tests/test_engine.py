"""The serving engine against generate(): mixed batches, chunked prefill, slots reused, sampling
options, stop conditions, log-probs; preparing a model for serving and undoing it; the memory
planner. (The slot attention kernel: test_slot_attention.py; the MoE pipeline's serving
configuration: test_moe_pipeline.py.)"""

import math

import pytest
import torch

from minimax01 import ModelConfig, MiniMaxForCausalLM, generate
from minimax01.infer.sampling import filter_rows
from minimax01.infer.detok import TextStream
from minimax01.infer.engine import Engine
from minimax01.infer.planner import GiB, plan_memory
from minimax01.infer.request import SamplingParams
from minimax01.infer.sampling import filter_logits
from minimax01.tokenizer import ByteTokenizer

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MiniMaxForCausalLM(ModelConfig.from_preset("debug")).eval()


def random_prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def test_engine_equals_generate_on_a_mixed_batch(model):
    # more prompts than slots (requests join as others leave), prompts longer than a prefill
    # chunk (chunked prefill from the slot's state), lengths from 1 to 150
    prompts = random_prompts([5, 40, 1, 150, 13, 70, 3, 64, 9])
    n_new = 8
    ref = generate(model, prompts, max_new_tokens=n_new)[:, -n_new:].tolist()
    eng = Engine(model, num_slots=3, max_context=256, prefill_chunk=48)
    outs = eng.generate(prompts, SamplingParams(max_tokens=n_new, **GREEDY))
    assert [o.token_ids for o in outs] == ref
    assert all(o.finish_reason == "length" for o in outs)
    assert eng.pool.free_slots == 3 and not eng.has_work()
    # each alone, one slot, whole prompt in one pass: the same tokens again
    for p, r in zip(prompts[:2], ref[:2]):
        solo = Engine(model, num_slots=1, max_context=256, prefill_chunk=1024)
        assert solo.generate([p], SamplingParams(max_tokens=n_new, **GREEDY))[0].token_ids == r


def test_requests_join_a_running_batch(model):
    prompts = random_prompts([20, 7, 31], seed=2)
    ref = generate(model, prompts, max_new_tokens=8)[:, -8:].tolist()
    eng = Engine(model, num_slots=4, max_context=128, prefill_chunk=16)
    params = SamplingParams(max_tokens=8, **GREEDY)
    got = {}
    ids = [eng.add_request(prompts[0], params)]
    for step in range(100):
        if step == 3:
            ids.append(eng.add_request(prompts[1], params))
        if step == 6:
            ids.append(eng.add_request(prompts[2], params))
        for out in eng.step():
            got.setdefault(out.request_id, []).extend(out.token_ids)
        if step > 6 and not eng.has_work():
            break
    assert [got[i] for i in ids] == ref


def test_stop_tokens_max_tokens_and_abort(model):
    prompt = random_prompts([12], seed=3)[0]
    free = generate(model, [prompt], max_new_tokens=6)[0, -6:].tolist()
    eng = Engine(model, num_slots=2, max_context=64)
    # stop at the 4th generated token: it is not returned
    out = eng.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True,
                                                stop_token_ids=[free[3]]))[0]
    assert out.token_ids == free[:free.index(free[3])] and out.finish_reason == "stop"
    # abort: the slot comes back and a final output says so
    rid = eng.add_request(prompt, SamplingParams(max_tokens=50, **GREEDY))
    eng.step()
    eng.step()
    assert eng.pool.free_slots == 1
    assert eng.abort(rid)
    final = [o for o in eng.step() if o.request_id == rid]
    assert final and final[0].finished and final[0].finish_reason == "abort"
    assert eng.pool.free_slots == 2 and not eng.has_work()


def test_context_limit_and_bad_requests(model):
    eng = Engine(model, num_slots=1, max_context=32)
    with pytest.raises(ValueError, match="context limit of 32"):
        eng.add_request([1] * 30, SamplingParams(max_tokens=3))
    with pytest.raises(ValueError, match="context limit"):
        eng.add_request([1] * 32, SamplingParams(max_tokens=None))
    with pytest.raises(ValueError, match="max_tokens"):
        eng.add_request([1], SamplingParams(max_tokens=-1))
    with pytest.raises(ValueError, match="top_p"):
        eng.add_request([1], SamplingParams(top_p=0.0))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.add_request([1, 100000])
    with pytest.raises(ValueError, match="empty"):
        eng.add_request([])
    # max_tokens None: runs to the context limit
    out = eng.generate([[5] * 28], SamplingParams(max_tokens=None, **GREEDY))[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"


def test_sampling_seeds_topk_and_logprobs(model):
    prompts = random_prompts([9, 17, 4], seed=4)
    eng = Engine(model, num_slots=4, max_context=64)
    p = SamplingParams(max_tokens=6, temperature=0.9, top_k=40, top_p=0.9, seed=123,
                       ignore_eos=True)
    # a seeded request gives the same tokens alone, in a batch, and as generate(seed=...)
    alone = eng.generate([prompts[0]], p)[0].token_ids
    mixed = eng.generate(prompts, [p, SamplingParams(max_tokens=6, temperature=1.0),
                                   SamplingParams(max_tokens=6, temperature=1.0, seed=7)])
    assert mixed[0].token_ids == alone
    ref = generate(model, [prompts[0]], max_new_tokens=6, temperature=0.9, top_k=40, top_p=0.9,
                   seed=123)[0, -6:].tolist()
    assert alone == ref
    # top_k = 1 is greedy
    greedy = eng.generate([prompts[1]], SamplingParams(max_tokens=5, **GREEDY))[0].token_ids
    top1 = eng.generate([prompts[1]], SamplingParams(max_tokens=5, temperature=2.0, top_k=1,
                                                     ignore_eos=True))[0].token_ids
    assert top1 == greedy
    # log-probs: the model's log-softmax at each chosen token, top alternatives sorted
    out = eng.generate([prompts[2]], SamplingParams(max_tokens=3, logprobs=3, **GREEDY))[0]
    seq = torch.tensor([prompts[2] + out.token_ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(seq).logits[0].float(), -1)
    for i, tl in enumerate(out.logprobs):
        row = lp[len(prompts[2]) - 1 + i]
        assert tl.token_id == out.token_ids[i]
        assert tl.logprob == pytest.approx(row[tl.token_id].item(), abs=1e-4)
        assert [t for t, _ in tl.top] == row.topk(3).indices.tolist()
        assert tl.top[0][0] == tl.token_id  # greedy picks the most likely


def test_filter_rows_matches_filter_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    ks, ps = [0, 5, 1, 20], [1.0, 0.8, 0.5, 0.3]
    got = filter_rows(logits, torch.tensor(ks), torch.tensor(ps))
    for i, (k, p) in enumerate(zip(ks, ps)):
        want = filter_logits(logits[i:i + 1], k or None, p)
        assert torch.equal(got[i:i + 1].isinf(), want.isinf())
        assert torch.allclose(got[i][~got[i].isinf()], want[0][~want[0].isinf()])


def test_text_stream_stop_strings_and_partial_characters():
    tok = ByteTokenizer()
    s = TextStream(tok, stop=["END"])
    pieces = [s.push(t) for t in tok.encode("héllo wE")]
    assert "".join(pieces) == "héllo w"  # "E" held back: it may start "END"
    assert s.push(ord("N")) == "" and s.push(ord("D")) == "" and s.stopped
    assert s.finish() == "" and s.text == "héllo w"
    s = TextStream(tok)
    b = "é".encode()
    assert s.push(b[0]) == ""  # half a character waits
    assert s.push(b[1]) == "é"
    s = TextStream(tok, stop=["xyz"])
    assert "".join(s.push(t) for t in tok.encode("abxy")) == "ab"
    assert s.finish() == "xy"


def test_stop_string_in_engine(model):
    tok = ByteTokenizer()
    prompt = random_prompts([10], seed=5)[0]
    full = Engine(model, tok, num_slots=1, max_context=64).generate(
        [prompt], SamplingParams(max_tokens=12, **GREEDY))[0]
    text = tok.decode(full.token_ids)
    stop = next((text[i:i + 2] for i in range(2, len(text) - 1) if text[i:i + 2].isprintable()),
                None)
    if stop is None:
        pytest.skip("the random model printed nothing printable")
    out = Engine(model, tok, num_slots=1, max_context=64).generate(
        [prompt], SamplingParams(max_tokens=12, stop=[stop], **GREEDY))[0]
    assert out.text == text[:text.find(stop)] and out.finish_reason == "stop"


def test_planner():
    cfg = ModelConfig.from_preset("1b")
    plan = plan_memory(cfg, 78 * GiB, 1 << 20, prefill_chunk=16384)
    # 2 softmax layers x K,V x 4 heads x 128 x 2 bytes per token; 14 lightning states of 16x128x128 fp32
    assert plan.kv_bytes_per_slot == 2 * 2 * 4 * 128 * 2 * (1 << 20)
    assert plan.state_bytes_per_slot == 14 * 16 * 128 * 128 * 4
    expect = (int(78 * GiB * 0.9) - plan.activation_bytes) // plan.slot_bytes - 1
    assert plan.num_slots == expect and 10 <= plan.num_slots <= 17
    assert plan.pool_bytes + plan.activation_bytes <= plan.budget_bytes
    short = plan_memory(cfg, 78 * GiB, 8192, max_slots=256)
    assert short.num_slots == 256
    text01 = ModelConfig.from_preset("minimax-text-01")
    with pytest.raises(ValueError, match="does not fit"):
        plan_memory(text01, 80 * GiB, 1 << 20, weights_loaded=False)
    assert math.isclose(text01.lightning_state_bytes() / 1e6, 293.6, rel_tol=1e-3)


def test_prepare_for_serving_is_explicit_and_undone_by_close():
    from minimax01.infer.prepare import prepare_for_serving
    from minimax01.ops.moe import SERVING, TRAINING

    torch.manual_seed(0)
    m = MiniMaxForCausalLM(ModelConfig.from_preset("debug")).train()
    prompts = random_prompts([6, 30, 2], seed=7)
    ref = generate(m.eval(), prompts, max_new_tokens=5)[:, -5:].tolist()
    m.train()
    # the serving pipeline (sync-free: what CUDA graphs capture) on the CPU gives the same tokens
    restore = prepare_for_serving(m, sync_free=True)
    assert not m.training and all(l.mlp.pipeline is SERVING for l in m.model.layers)
    eng = Engine(m, num_slots=2, max_context=64, prefill_chunk=16)
    assert [o.token_ids for o in eng.generate(prompts, SamplingParams(max_tokens=5, **GREEDY))] \
        == ref
    eng.close()  # the engine's own preparation undone: still the caller's serving form
    assert all(l.mlp.pipeline is SERVING for l in m.model.layers) and not m.training
    restore()
    assert m.training and all(l.mlp.pipeline is TRAINING for l in m.model.layers)
    # on the CPU the engine alone keeps the default pipeline (faster there) and restores the mode
    eng = Engine(m, num_slots=1, max_context=32)
    assert not m.training and all(l.mlp.pipeline is TRAINING for l in m.model.layers)
    eng.close()
    assert m.training


def test_decode_buckets():
    from minimax01.infer.cuda_graphs import decode_buckets

    assert decode_buckets(1) == [1]
    assert decode_buckets(256)[:8] == [1, 2, 4, 8, 16, 32, 48, 64]
    assert decode_buckets(256)[-1] == 256 and decode_buckets(100)[-1] == 100
    assert all(b <= 100 for b in decode_buckets(100))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
def test_cuda_engine_logprobs_match_a_full_forward():
    """CUDA graphs, the Triton slot attention and lightning kernels, chunked prefill: the
    log-prob the engine reports for each token equals a cache-free forward over the text."""
    from minimax01.infer.engine import cast_model

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug", num_key_value_heads=1, head_dim=32, rotary_dim=16)
    with torch.device("cuda"):
        m = cast_model(MiniMaxForCausalLM(cfg).eval(), dtype=torch.bfloat16)
    prompts = random_prompts([3, 200, 17, 90, 1, 64], seed=6)
    eng = Engine(m, num_slots=4, max_context=300, prefill_chunk=128)
    assert eng.graphs is not None and eng.cache.attention == "triton"
    outs = eng.generate(prompts, SamplingParams(max_tokens=12, logprobs=0, **GREEDY))
    for p, o in zip(prompts, outs):
        seq = torch.tensor([p + o.token_ids], device="cuda")
        with torch.no_grad():
            lp = torch.log_softmax(m(seq).logits[0].float(), -1)
        want = [lp[len(p) - 1 + i, t].item() for i, t in enumerate(o.token_ids)]
        got = [t.logprob for t in o.logprobs]
        assert max(abs(a - b) for a, b in zip(got, want)) < 0.05, (got, want)
    assert eng.pool.free_slots == 4
