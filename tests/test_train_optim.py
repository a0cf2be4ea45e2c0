"""AdamW parameter groups, LR schedules and the batch-size warm-up."""

import math

import pytest
import torch

from minimax01 import MiniMaxForCausalLM, ModelConfig
from minimax01.train.config import OptimConfig
from minimax01.train.optim import build_optimizer, lr_at, micro_batches_at, param_groups


def test_no_weight_decay_on_norms_and_embeddings():
    model = MiniMaxForCausalLM(ModelConfig.from_preset("debug"))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "model.embed_tokens.weight" in no_decay_names and "model.norm.weight" in no_decay_names
    assert all(("norm" in n or "embed" in n) for n in no_decay_names)
    assert "model.layers.0.self_attn.norm.weight" in no_decay_names
    assert "lm_head.weight" in decay_names and "model.layers.0.mlp.experts.gate_up_proj" in decay_names
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))
    opt = build_optimizer(model, OptimConfig())
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_warmup_then_wsd():
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="wsd", decay_fraction=0.2)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(lr == 1.0 for lr in lrs[10:80])
    assert lrs[80] < 1.0 and lrs[99] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:]))


def test_cosine_and_linear_end_at_the_floor():
    for schedule in ("cosine", "linear"):
        cfg = OptimConfig(lr=2.0, min_lr_ratio=0.05, warmup_steps=5, schedule=schedule)
        assert lr_at(4, 50, cfg) == pytest.approx(2.0)
        assert lr_at(49, 50, cfg) == pytest.approx(0.1)
    cfg = OptimConfig(lr=2.0, min_lr_ratio=0.0, warmup_steps=0, schedule="cosine")
    assert lr_at(50, 101, cfg) == pytest.approx(1.0)  # halfway down the half cosine
    assert lr_at(25, 101, cfg) == pytest.approx(1.0 + math.cos(math.pi / 4))


def test_batch_size_warmup_doubles_at_token_marks():
    marks = [100, 1000]
    assert [micro_batches_at(t, 8, marks) for t in (0, 99, 100, 999, 1000, 10**9)] == [2, 2, 4, 4, 8, 8]
    assert micro_batches_at(0, 3, []) == 3


def test_optimizer_step_changes_only_decayed_weights_under_zero_grad():
    model = MiniMaxForCausalLM(ModelConfig.from_preset("debug"))
    opt = build_optimizer(model, OptimConfig(lr=0.1, weight_decay=0.5))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p)
        assert changed == (p.ndim >= 2 and "embed_tokens" not in n), n
