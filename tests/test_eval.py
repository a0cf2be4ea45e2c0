"""Evaluations: chunked perplexity equals the full-forward loss; retrieval scoring counts right."""

import math

import pytest
import torch
import torch.nn.functional as F

from minimax01 import MiniMaxForCausalLM, ModelConfig
from minimax01.eval import evaluate_retrieval, perplexity
from minimax01.eval import retrieval as retrieval_mod
from minimax01.tokenizer import ByteTokenizer


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return MiniMaxForCausalLM(ModelConfig.from_preset("debug")).eval()


def test_perplexity_equals_full_forward_and_ignores_chunking():
    model = tiny_model()
    ids = torch.randint(0, 256, (3 * 40 + 7,))
    res = perplexity(model, ids, context=40, chunk=13)
    ref = []
    for w in range(3):
        window = ids[w * 40:(w + 1) * 40][None]
        logits = model(window).logits[0]
        ref.append(F.cross_entropy(logits[:-1], window[0, 1:], reduction="none"))
    ref = torch.cat(ref)
    assert res.tokens == 3 * 39
    assert res.nll == pytest.approx(ref.mean().item(), rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(ref.mean().item()), rel=1e-5)
    assert sum(n for *_, n in res.buckets) == res.tokens
    again = perplexity(model, ids, context=40, chunk=40)
    assert again.nll == pytest.approx(res.nll, rel=1e-6)
    assert perplexity(model, ids, context=40, max_windows=1).tokens == 39


def test_perplexity_bad_input():
    model = tiny_model()
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, [1, 2, 3], context=10)


def test_retrieval_scores_answers(monkeypatch):
    model = tiny_model()
    tok = ByteTokenizer()
    calls = []

    def fake_generate(model, prompts, max_new_tokens):
        # answer correctly for every other prompt: the scorer must count exactly those
        width = max(len(p) for p in prompts)
        rows = []
        for p in prompts:
            text = tok.decode(p)
            key = text.split("pass key is ")[1].split(".")[0]
            n = len(calls)
            calls.append(key)
            cont = tok.encode(key if n % 2 == 0 else "00000")
            cont = (cont + [0] * max_new_tokens)[:max_new_tokens]
            rows.append([258] * (width - len(p)) + p + cont)
        return torch.tensor(rows)

    monkeypatch.setattr(retrieval_mod, "generate", fake_generate)
    res = evaluate_retrieval(model, tok, "passkey", lengths=[200, 300], depths=[0.0, 1.0],
                             samples=2, batch_size=3)
    assert sum(res.total.values()) == 8
    assert sum(res.correct.values()) == 4
    assert res.accuracy() == 0.5
    assert "length" in res.table()


def test_retrieval_runs_end_to_end_with_a_real_model():
    model = tiny_model(1)
    res = evaluate_retrieval(model, ByteTokenizer(), "needle", lengths=[128], depths=[0.5],
                             samples=2, batch_size=2)
    assert sum(res.total.values()) == 2
    for s in res.samples:  # token-level scoring agrees with the decoded text
        assert s["answer"] and s["correct"] == s["output"].startswith(s["answer"])
