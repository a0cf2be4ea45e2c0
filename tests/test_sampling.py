"""The one sampler (infer/sampling.py) shared by generate() and the engine: filters against a
plain per-row reference, numerical safety at extreme values, broken rows isolated, logit_bias,
seeded rows; the engine ending only the failing request; SamplingParams' errors as data;
TextStream's returned-token count and text offsets."""

import math

import pytest
import torch

from minimax01 import ModelConfig, MiniMaxForCausalLM, generate
from minimax01.infer.detok import TextStream
from minimax01.infer.engine import Engine
from minimax01.infer.request import RequestError, SamplingParams
from minimax01.infer.sampling import (BROKEN, filter_logits, filter_rows, sample, sample_rows,
                                      token_logprobs)
from minimax01.tokenizer import ByteTokenizer

P = SamplingParams


def reference_filter(row: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """Top-k then nucleus top-p for one row, by the definitions, in plain Python."""
    v = row.numel()
    order = sorted(range(v), key=lambda i: -row[i].item())
    keep = set(order[:k] if 0 < k < v else order)
    kth = min(row[i].item() for i in keep)
    keep = {i for i in range(v) if row[i].item() >= kth}  # ties at the k-th stay
    if p < 1.0:
        probs = torch.softmax(torch.tensor([row[i].item() if i in keep else -math.inf
                                            for i in range(v)]), 0)
        mass, nucleus = 0.0, set()
        for i in sorted(keep, key=lambda i: -row[i].item()):
            if mass >= p and nucleus:
                break
            nucleus.add(i)
            mass += probs[i].item()
        keep = nucleus
    return torch.tensor([row[i].item() if i in keep else -math.inf for i in range(v)])


def test_filter_rows_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=g)
    ks, ps = [0, 5, 1, 20, 40, 3], [1.0, 0.8, 0.5, 0.3, 1e-9, 0.99]
    got = filter_rows(logits, torch.tensor(ks), torch.tensor(ps))
    for i, (k, p) in enumerate(zip(ks, ps)):
        torch.testing.assert_close(got[i], reference_filter(logits[i], k, p))
        torch.testing.assert_close(filter_logits(logits[i:i + 1], k or None, p)[0], got[i])


def test_extreme_values_are_safe_and_tend_to_greedy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 64, generator=g) * 5
    argmax = logits.argmax(-1)
    for p in [P(temperature=1e-40), P(temperature=5e-324), P(top_p=1e-300),
              P(temperature=2, top_p=1e-300), P(temperature=1e-30, top_k=2 ** 62),
              P(temperature=1, top_k=1)]:
        tok = sample_rows(logits, [p] * 4, [None] * 4, torch.Generator().manual_seed(0))
        assert torch.equal(tok, argmax), p
    # huge temperature: uniform over what is not -inf, never a masked token
    masked = logits.clone()
    masked[:, :32] = -math.inf
    draws = torch.stack([sample_rows(masked, [P(temperature=1e300)] * 4, [None] * 4,
                                     torch.Generator().manual_seed(s)) for s in range(200)])
    assert draws.min() >= 32 and len(draws.unique()) > 25
    # a huge top_k is "off", not an overflow
    tok = sample_rows(logits[:1], [P(temperature=1.0, top_k=2 ** 63 - 1, seed=3)], [None],
                      torch.Generator().manual_seed(0))
    assert 0 <= tok.item() < 64


def test_broken_rows_are_marked_and_the_others_unaffected():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 30, generator=g)
    params = [P(temperature=0.8, seed=1), P(temperature=0.0), P(temperature=1.0, top_p=0.9),
              P(temperature=0.7, top_k=5, seed=2), P(temperature=1.2)]

    def run(lg):
        gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None
                for p in params]
        return sample_rows(lg, params, gens, torch.Generator().manual_seed(9))

    clean = run(logits)
    for fill in (float("nan"), float("inf")):
        bad = logits.clone()
        bad[2, 7] = fill
        bad[4, :] = -math.inf  # nothing left to sample
        got = run(bad)
        assert got[2] == BROKEN and got[4] == BROKEN
        assert got[0] == clean[0] and got[1] == clean[1] and got[3] == clean[3]  # seeded, greedy
    with pytest.raises(FloatingPointError, match=r"row\(s\) \[1\]"):
        sample(torch.stack([logits[0], torch.full((30,), float("nan"))]))


def test_logit_bias():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 2)
    assert sample_rows(logits, [P(temperature=0, logit_bias={3: 100})] * 2, [None] * 2).tolist() \
        == [3, 3]
    assert sample_rows(logits, [P(temperature=0, logit_bias={0: -100}), P(temperature=0,
                                                                         logit_bias={})],
                       [None] * 2).tolist() == [1, 0]
    hot = P(temperature=1.0, logit_bias={0: -100, 1: -100, 2: -100})
    assert set(sample_rows(logits.repeat(50, 1), [hot] * 100, [None] * 100).tolist()) == {3}
    # the bias tensors are built once per params object and follow a replaced mapping
    p = P(temperature=0, logit_bias={2: 100})
    assert sample_rows(logits[:1], [p], [None]).item() == 2
    p.logit_bias = {1: 100}
    assert sample_rows(logits[:1], [p], [None]).item() == 1
    # log-probs stay those of the raw logits
    lp = token_logprobs(logits[:1], torch.tensor([3]), [1])[0]
    assert lp.logprob == pytest.approx(torch.log_softmax(logits[0], 0)[3].item())


def test_a_seeded_row_draws_the_same_alone_and_in_a_batch():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 50, generator=g)
    p = P(temperature=0.9, top_k=20, top_p=0.95, seed=11)
    alone = sample_rows(logits[1:2], [p], [torch.Generator().manual_seed(11)])
    batch = sample_rows(logits, [P(temperature=1.0), p, P(temperature=0)],
                        [None, torch.Generator().manual_seed(11), None])
    assert batch[1] == alone[0]
    # and as generate()'s sampler, for a batch of one
    assert sample(logits[1:2], 0.9, 20, 0.95, torch.Generator().manual_seed(11)) == alone


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MiniMaxForCausalLM(ModelConfig.from_preset("debug")).eval()


def test_generate_and_the_engine_sample_alike(model):
    prompt = [5, 17, 99, 3]
    kw = dict(temperature=0.8, top_k=30, top_p=0.9, seed=5, logit_bias={65: 3.0, 66: -100})
    ref = generate(model, [prompt], max_new_tokens=8, **kw)[0, len(prompt):].tolist()
    eng = Engine(model, num_slots=2, max_context=64)
    out = eng.generate([prompt], P(max_tokens=8, ignore_eos=True, **kw))[0]
    assert out.token_ids == ref and 66 not in ref
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [prompt], temperature=float("nan"))


class FailingTokenizer(ByteTokenizer):
    def decode(self, ids):
        if 200 in ids:
            raise RuntimeError("cannot decode token 200")
        return super().decode(ids)


class NaNEngine(Engine):
    def _sample(self, rows, logits):
        bad = [i for i, s in enumerate(rows) if s.params.seed == 666]
        if bad:
            logits = logits.clone()
            logits[bad] = float("nan")
        return super()._sample(rows, logits)


def test_the_engine_ends_only_the_failing_request(model):
    tok = FailingTokenizer()
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    ok = P(max_tokens=6, temperature=0, ignore_eos=True)
    ref = generate(model, prompts, max_new_tokens=6)[:, -6:].tolist()
    eng = NaNEngine(model, tok, num_slots=3, max_context=64)
    outs = eng.generate(prompts, [ok, P(max_tokens=6, temperature=0, ignore_eos=True, seed=666),
                                  P(max_tokens=6, temperature=0, ignore_eos=True,
                                    logit_bias={200: 100})])
    assert outs[0].token_ids == ref[0] and outs[0].finish_reason == "length"
    assert outs[1].finish_reason == "error" and "NaN" in outs[1].error
    assert outs[2].finish_reason == "error" and "cannot decode" in outs[2].error
    assert eng.pool.free_slots == 3 and not eng.has_work()


def test_sampling_params_errors_are_data():
    cases = [(P(temperature=float("nan")), "temperature"), (P(temperature=-1), "temperature"),
             (P(top_p=0), "top_p"), (P(top_k=2 ** 70), "top_k"), (P(top_k=-2), "top_k"),
             (P(seed=2 ** 63), "seed"), (P(stop=["a"] * 5), "stop"), (P(stop=[""]), "stop"),
             (P(logprobs=21), "logprobs"), (P(logit_bias={1: 101}), "logit_bias"),
             (P(logit_bias={-1: 1}), "logit_bias"), (P(logit_bias={1: float("inf")}),
                                                      "logit_bias"),
             (P(max_tokens=0), "max_tokens"), (P(stop_token_ids=[300]), "stop_token_ids")]
    for params, field in cases:
        with pytest.raises(RequestError) as e:
            params.validate(vocab_size=259)
        assert e.value.param == field and e.value.code == "invalid_value", (params, e.value)
        assert str(e.value).startswith(field)
    P(top_k=-1, seed=-2 ** 63, logit_bias={}, stop=["x"] * 4).validate(259)  # all allowed


def test_engine_request_errors_carry_codes(model):
    eng = Engine(model, num_slots=1, max_context=32)
    for prompt, params, code, param in [
            ([1] * 40, P(max_tokens=1), "context_length_exceeded", "prompt"),
            ([1] * 10, P(max_tokens=30), "context_length_exceeded", "max_tokens"),
            ([], P(), "invalid_value", "prompt"), ([1, 10 ** 6], P(), "invalid_value", "prompt"),
            ([1, 2.5], P(), "invalid_value", "prompt"), ("abc", P(), "invalid_value", "prompt"),
            ([1], P(stop=["x"]), "invalid_value", "stop")]:
        with pytest.raises(RequestError) as e:
            eng.add_request(prompt, params)
        assert (e.value.code, e.value.param) == (code, param), (prompt, e.value)


def test_text_stream_counts_returned_tokens_and_offsets():
    tok = ByteTokenizer()
    s = TextStream(tok, stop=["STOP"])
    text = "héllo STOP more"
    out = ""
    for t in tok.encode(text):
        out += s.push(t)
        if s.stopped:
            break
    out += s.finish()
    assert out == "héllo " and s.returned_tokens == len("héllo ".encode())
    assert s.starts[:3] == [0, 1, 1]  # "é" is two tokens, both starting at character 1
    assert s.starts[3] == 2
    s = TextStream(tok, stop=["lo"])  # the stop string inside a token's text: that token counts
    for t in tok.encode("hello"):
        s.push(t)
    assert s.stopped and s.text == "hel" and s.returned_tokens == 3
    s = TextStream(tok)
    for t in tok.encode("abc"):
        s.push(t)
    assert s.returned_tokens == 3 and s.finish() == ""


def test_text_stream_long_stop_strings_stay_cheap():
    tok = ByteTokenizer()
    stop = "a" * 1000 + "b"
    s = TextStream(tok, stop=[stop])
    released = "".join(s.push(t) for t in tok.encode("a" * 3000))
    assert released == "a" * 2000  # the last 1000 "a" may still become the stop string
    assert "".join(s.push(t) for t in tok.encode("c")) == "a" * 1000 + "c"
