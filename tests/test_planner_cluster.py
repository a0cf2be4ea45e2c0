"""Planning memory over several GPUs (infer/planner.py `plan_cluster`, `info --gpus`): weights
sharded as the tensor-parallel plan says, 8-bit weights as the loader stores them, K/V and
lightning state per rank, the longest contexts and sequences that fit, a bandwidth-floor decode
step, the exact reason when nothing fits; and the --quantization flags of the commands."""

import json

import pytest
import torch

from minimax01 import MiniMaxForCausalLM, ModelConfig
from minimax01.cli import build_parser, main
from minimax01.infer.planner import (ALLREDUCE_US, GiB, expected_experts, plan_cluster,
                                     rank_weight_bytes)
from minimax01.tokenizer import ByteTokenizer

TEXT01 = ModelConfig.from_preset("minimax-text-01")


def test_weights_per_gpu_follow_the_plan():
    cfg = TEXT01
    total16 = cfg.weight_bytes(2)
    h, v = cfg.hidden_size, cfg.vocab_size
    replicated = (cfg.num_hidden_layers * (2 * h + cfg.num_local_experts * h) + h) * 2
    w = rank_weight_bytes(cfg, 8)
    assert w["total"] == (total16 - replicated) / 8 + replicated
    assert w["lm_head"] == v // 8 * h * 2
    q = rank_weight_bytes(cfg, 8, "int8")
    e, i, L = cfg.num_local_experts, cfg.intermediate_size, cfg.num_hidden_layers
    experts8 = L * e * 3 * h * i // 8                                  # 1 byte a weight
    scales = L * e * (2 * i // 8 + h) * 4                               # fp32, down_proj's whole
    assert q["expert"] == experts8 + scales
    assert q["per_expert"] * e == q["expert"]
    assert 0.49 < q["total"] / w["total"] < 0.52
    assert rank_weight_bytes(cfg, 8, "fp8")["total"] == q["total"]


def test_cluster_plan_numbers():
    p = plan_cluster(TEXT01, 8, 139 * GiB, quantization="int8", bandwidth_tb_s=4.8)
    assert (p.tensor_parallel, p.replicas, p.quantization) == (8, 1, "int8")
    assert p.kv_bytes_per_token == 10 * 2 * 1 * 128 * 2                 # one KV head per rank
    assert p.state_bytes_per_seq == 70 * 8 * 128 * 128 * 4              # 8 heads per rank
    room = p.free_bytes
    for n, ctx in p.max_context.items():  # n sequences + the scratch slot
        assert (n + 1) * (p.state_bytes_per_seq + p.kv_bytes_per_token * ctx) <= room
        assert (n + 1) * (p.state_bytes_per_seq + p.kv_bytes_per_token * (ctx + 1)) > room
    assert p.max_context[8] >= 1 << 20                                  # the 1M x 8 goal
    assert p.sequences[1 << 20] >= 8
    assert p.allreduces_per_step == 161
    steps = list(p.decode_ms.values())
    assert steps == sorted(steps) and steps[0] > p.allreduces_per_step * ALLREDUCE_US / 1e3
    j = json.loads(json.dumps(p.to_json()))
    assert j["gib_per_gpu"]["weights"] == pytest.approx(p.weights_bytes / GiB, abs=1e-3)
    two = plan_cluster(TEXT01, 16, 139 * GiB, quantization="int8", tensor_parallel=8)
    assert two.replicas == 2 and two.weights_bytes == p.weights_bytes


def test_expected_experts():
    assert expected_experts(TEXT01, 1) == pytest.approx(2.0)
    assert 31.4 < expected_experts(TEXT01, 64) < 32
    assert expected_experts(TEXT01, 16) == pytest.approx(32 * (1 - (30 / 32) ** 16))


def test_why_not():
    with pytest.raises(ValueError) as e:
        plan_cluster(TEXT01, 8, 80 * GiB)
    msg = str(e.value)
    assert msg.startswith("does not fit: bfloat16 weights need 106.2 GiB per GPU under tensor "
                          "parallel 8") and "72.0 GiB usable" in msg and "--quantization int8" in msg
    with pytest.raises(ValueError, match="does not divide num_attention_heads=64"):
        plan_cluster(TEXT01, 6, 80 * GiB)
    with pytest.raises(ValueError, match="--tensor-parallel 8 does not divide --gpus 12"):
        plan_cluster(TEXT01, 12, 80 * GiB, tensor_parallel=8)


# ------------------------------------------------------------------ command line
def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_info_gpus_text_and_json(capsys):
    code, out, _ = run_cli(capsys, "info", "--preset", "minimax-text-01", "--gpus", 8,
                           "--gpu-memory", 139, "--quantization", "int8", "--gpu-bandwidth", 4.8)
    assert code == 0
    assert "tensor parallel 8 x 1 replica(s), weights int8" in out
    assert "53.49 GiB" in out and "batch 1@8192" in out
    code, out, _ = run_cli(capsys, "info", "--preset", "minimax-text-01", "--gpus", 4,
                           "--gpu-memory", 139, "--quantization", "int8", "--json")
    data = json.loads(out)
    assert code == 0 and data["fits"] and data["tensor_parallel"] == 4
    code, out, _ = run_cli(capsys, "info", "--preset", "minimax-text-01", "--gpus", 8,
                           "--gpu-memory", 79.6, "--json")
    data = json.loads(out)
    assert code == 1 and not data["fits"] and "106.2 GiB per GPU" in data["reason"]
    code, out, _ = run_cli(capsys, "info", "--preset", "minimax-text-01", "--gpus", 8,
                           "--gpu-memory", 79.6)
    assert code == 1 and "does not fit" in out


@pytest.mark.parametrize("argv, fragment", [
    (["--gpus", 8], "give --gpu-memory GiB too"),
    (["--gpus", 6, "--gpu-memory", 80], "does not divide num_attention_heads=64"),
    (["--gpus", 0, "--gpu-memory", 80], "--gpus must be positive"),
    (["--gpus", 8, "--gpu-memory", 80, "--gpu-bandwidth", -1], "--gpu-bandwidth must be positive"),
])
def test_info_gpus_errors(capsys, argv, fragment):
    code, _, err = run_cli(capsys, "info", "--preset", "minimax-text-01", *argv)
    assert code == 2 and err.startswith("error: ") and fragment in err and "Traceback" not in err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    MiniMaxForCausalLM(ModelConfig.from_preset("debug")).save_pretrained(path)
    ByteTokenizer().save(path)
    return path


def test_generate_quantized(capsys, checkpoint):
    base = ["generate", "--checkpoint", checkpoint, "--prompt", "hello", "--max-new-tokens", 4]
    for q in ("int8", "fp8", "none"):
        code, out, err = run_cli(capsys, *base, "--quantization", q)
        assert code == 0, err
    with pytest.raises(SystemExit) as e:  # argparse's own usage error
        run_cli(capsys, *base, "--quantization", "int4")
    assert e.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err


def test_eval_and_serve_take_the_flag(capsys, checkpoint, tmp_path):
    data = tmp_path / "t.txt"
    data.write_text("abcdefgh " * 40)
    code, out, err = run_cli(capsys, "eval", "ppl", "--checkpoint", checkpoint, "--data", data,
                             "--context", 64, "--max-windows", 1, "--device", "cpu",
                             "--quantization", "int8")
    assert code == 0, err
    args = build_parser().parse_args(["serve", "--checkpoint", str(checkpoint),
                                      "--quantization", "fp8"])
    assert args.quantization == "fp8"
    q = tmp_path / "q"
    from minimax01.quant import quantize_model
    quantize_model(MiniMaxForCausalLM.from_pretrained(checkpoint), "int8").save_pretrained(q)
    ByteTokenizer().save(q)
    code, _, err = run_cli(capsys, "generate", "--checkpoint", q, "--prompt", "x",
                           "--quantization", "fp8")
    assert code == 2 and "holds int8 weights, not fp8" in err and len(err.strip().splitlines()) == 1


def test_plan_without_full_softmax_layers():
    """Pure lightning (and lightning + sliding-window) models have no K/V that grows: every
    context up to max_position_embeddings fits; the sliding layers' window is counted."""
    from minimax01.config import LINEAR, SLIDING

    lin = ModelConfig.from_preset("debug", layer_types=[LINEAR] * 4)
    p = plan_cluster(lin, 1, 80 * GiB)
    assert p.kv_bytes_per_token == 0 and p.max_context[8] == lin.max_position_embeddings
    swa = ModelConfig.from_preset("debug", layer_types=[LINEAR, SLIDING] * 2, sliding_window=64)
    s = plan_cluster(swa, 1, 80 * GiB)
    assert s.state_bytes_per_seq == swa.lightning_state_bytes() + swa.sliding_cache_bytes(2)
    assert any("serve` refuses sliding_attention" in n for n in s.notes)
