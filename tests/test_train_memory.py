"""train/memory.py against a hand computation on the `debug` model, and `info --train`."""

import json

import pytest

from minimax01.cli import main
from minimax01.config import ModelConfig
from minimax01.train.memory import count_parameters, min_gpus, plan_training

CFG = ModelConfig.from_preset("debug")  # h 64, W 64, KV 32, I 64, 4 experts top-2, 4 layers
# by hand: lightning layer dense = qkv 3*64*64 + gate 64*64 + out 64*64 + its norm 64 + two norms
# 128 + router 4*64 = 20928; softmax dense = q 4096 + k 2048 + v 2048 + o 4096 + 128 + 256 = 12672;
# experts 4 * 3 * 64 * 64 = 49152 per layer; embed 512 * 64; root = final norm 64 + lm_head 32768
TOTAL = 2 * 20928 + 2 * 12672 + 4 * 49152 + 32768 + 32832


def test_counts_by_hand():
    c = count_parameters(CFG)
    assert c.layer_dense == [20928, 12672, 20928, 12672]
    assert c.layer_experts == [49152] * 4
    assert (c.embed, c.root) == (32768, 32832)
    assert c.total == TOTAL == CFG.num_parameters()
    lora = count_parameters(CFG, 2, ["qkv_proj", "q_proj"])
    # qkv_proj: A 2x64 + B 192x2 (two lightning layers); q_proj: A 2x64 + B 64x2 (two softmax)
    assert lora.lora == 2 * (128 + 384) + 2 * (128 + 128)
    # frozen matrices of the layers: lightning 12288+4096+4096+256+49152, softmax 12288+256+49152
    assert lora.frozen_low == 2 * 69888 + 2 * 61696


def test_full_finetuning_plan_by_hand():
    p = plan_training(CFG, 2, ep=2, tokens=100, recompute="none", overhead=0)
    assert p.parts["weights"] == TOTAL * 4 / 2
    assert p.parts["gradients"] == TOTAL * 4 / 2
    assert p.parts["optimizer"] == TOTAL * 8 / 2
    # the two biggest layers gathered (dense + experts/ep, fp32 weights + fp32 grads) + root x 2
    assert p.parts["gathered"] == 2 * 8 * (20928 + 49152 / 2) + 32832 * 4 * 2
    # per token: lightning 20h + 28W + H d^2 4/B + MoE(8E + k(8h + 8I)) = 1280+1792+256+(32+2048);
    # softmax 1280 + 4(W+2KV) + 2W + 4H + 2080 = 4016; plus embedding / final norm 2 * 4h
    assert p.parts["activations"] == 100 * (2 * 5408 + 2 * 4016 + 512)
    assert p.parts["loss"] == 100 * 512 * 10
    full = plan_training(CFG, 2, ep=2, tokens=100, recompute="full", overhead=0, cp=2)
    assert full.parts["activations"] == 50 * (4 * 4 * 64 + 2 * 5408 + 512)
    assert full.total == sum(full.parts.values())


def test_lora_plan_by_hand():
    p = plan_training(CFG, 1, lora_rank=2, lora_targets=["qkv_proj", "q_proj"], tokens=10,
                      overhead=0)
    lora, low = 1536, 263168
    assert p.parts["weights"] == low * 2 + (TOTAL - low) * 4 + lora * 4
    assert p.parts["gradients"] == lora * 4 and p.parts["optimizer"] == lora * 8
    assert "gathered" not in p.parts  # one GPU: nothing is sharded
    assert p.trainable == lora and p.mode == "lora"


def test_min_gpus():
    kw = dict(tokens=100, recompute="none", overhead=0)
    one = plan_training(CFG, 1, **kw).total
    two = plan_training(CFG, 2, **kw).total
    assert one == TOTAL * 16 + 100 * 19360 + 512000
    assert two == TOTAL * 8 + 2 * 8 * (20928 + 49152) + 32832 * 8 + 100 * 19360 + 512000
    assert min_gpus(CFG, gpu_memory=one, **kw).gpus == 1
    assert min_gpus(CFG, gpu_memory=two, **kw).gpus == 2
    assert min_gpus(CFG, gpu_memory=two, ep=4, **kw).gpus % 4 == 0
    assert min_gpus(CFG, gpu_memory=1000, limit=64, **kw) is None


@pytest.mark.parametrize("kw, match", [(dict(ep=3), "ep=3"), (dict(etp=5), "etp=5"),
                                       (dict(cp=3), "multiple of cp"),
                                       (dict(recompute="some"), "recompute")])
def test_bad_layouts(kw, match):
    with pytest.raises(ValueError, match=match):
        plan_training(CFG, 4, **kw)


def test_info_train_json(capsys):
    code = main(["info", "--preset", "minimax-text-01", "--train", "--gpus", "16", "--lora",
                 "--parallel.ep", "8", "--json"])
    out = json.loads(capsys.readouterr().out)
    plan = out["plan"]
    assert code == (0 if plan["fits"] else 1)
    assert plan["mode"] == "lora" and plan["gpus"] == 16 and plan["ep"] == 8
    assert plan["total"] == pytest.approx(sum(plan["parts"].values()))
    assert out["gpu_memory_gib"] == 140.0 and out["min_gpus"] % 8 == 0
    # full fine-tuning of 456B parameters needs 16 bytes each over the GPUs, at least
    code = main(["info", "--preset", "minimax-text-01", "--train", "--parallel.ep", "8", "--json"])
    full = json.loads(capsys.readouterr().out)
    assert code == 0 and full["min_gpus"] * 140 * 2 ** 30 > 456e9 * 16


def test_info_train_text_and_errors(capsys):
    assert main(["info", "--preset", "debug", "--train", "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "full fine-tuning on 2 GPU(s)" in out and "AdamW moments" in out
    assert main(["info", "--preset", "debug", "--train", "--gpus", "2",
                 "--parallel.ep", "3"]) == 2
    assert "ep=3 must divide" in capsys.readouterr().err
