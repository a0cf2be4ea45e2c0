"""`python -m minimax01 info | generate | convert`: output, and one-line errors with exit status 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minimax01 import MiniMaxForCausalLM, ModelConfig, generate
from minimax01.accounting import MEMORY_CONTEXTS, kv_cache_bytes, memory_table
from minimax01.checkpoint import CheckpointReader
from minimax01.cli import main
from minimax01.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = MiniMaxForCausalLM(ModelConfig.from_preset("debug"))
    model.save_pretrained(path, dialect="legacy")
    ByteTokenizer().save(path)
    return path


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


# ---------------------------------------------------------------------- info
def test_info_text01(capsys):
    code, out, _ = run_cli(capsys, "info", "--preset", "minimax-text-01")
    assert code == 0
    assert "80 (70 lightning + 10 softmax)" in out
    total = next(line for line in out.splitlines() if line.startswith("total "))
    active = next(line for line in out.splitlines() if line.startswith("active per token"))
    assert total.split()[1:] == ["456.09B", "453.63B"]
    assert active.split()[3:] == ["48.40B", "45.94B"]
    row_1m = next(line for line in out.splitlines() if line.startswith("1M ") and "GiB" in line)
    assert row_1m.split() == ["1M", "1,048,576", "40.0", "GiB", "280.0", "MiB", "40.3", "GiB"]
    assert "40.0 KiB per token" in out and "70 layers x 4.0 MiB" in out
    assert "bf16         849.5 GiB" in out
    assert "FLOP" in out and "4K" in out


def test_memory_table_numbers():
    cfg = ModelConfig.from_preset("minimax-text-01")
    assert kv_cache_bytes(cfg, 10**6) == 40_960_000_000  # SPEC §8: about 41 GB at a million tokens
    assert cfg.lightning_state_bytes() == 293_601_280     # about 294 MB, whatever the length
    table = memory_table(cfg)
    assert [r[0] for r in table.rows] == ["8K", "32K", "128K", "512K", "1M", "2M", "4M"]
    assert len(MEMORY_CONTEXTS) == len(table.rows)


def test_info_checkpoint(capsys, checkpoint):
    code, out, _ = run_cli(capsys, "info", "--checkpoint", checkpoint)
    assert code == 0
    assert "legacy dialect, 79 tensors in 1 file(s)" in out and "(F32 x79)" in out
    assert "329.41K" in out  # the debug preset's parameters


@pytest.mark.parametrize("argv, fragments", [
    (["info", "--preset", "huge"], ["unknown preset 'huge'"]),
    (["info"], ["exactly one of --preset"]),
    (["info", "--preset", "debug", "--checkpoint", "x"], ["exactly one of --preset"]),
    (["info", "--checkpoint", "/nonexistent/ckpt"], ["no checkpoint at /nonexistent/ckpt"]),
])
def test_info_errors(capsys, argv, fragments):
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, *fragments)


def test_info_takes_model_and_run_presets(capsys):
    code, out, _ = run_cli(capsys, "info", "--preset", "1b")
    assert code == 0 and out.startswith("Model preset 1b\n")
    code, run_out, _ = run_cli(capsys, "info", "--preset", "1b-8k")
    assert code == 0 and run_out.startswith("Run preset 1b-8k: model preset 1b\n")
    assert run_out.split("\n", 1)[1] == out.split("\n", 1)[1]  # the same model, the same tables
    code, _, err = run_cli(capsys, "train", "--preset", "1b")
    assert_one_line_error(code, err, "'1b' is a model preset, not a run preset",
                          "--model.preset 1b")


def test_run_presets_named_like_model_presets_train_that_model():
    from minimax01.config import MODEL_PRESETS
    from minimax01.train.presets import RUN_PRESETS, model_preset_of
    from minimax01.vision.config import VL_PRESETS

    for name in RUN_PRESETS:  # (vl-demo trains a vision-language preset)
        assert model_preset_of(name) in MODEL_PRESETS or model_preset_of(name) in VL_PRESETS
        if name in MODEL_PRESETS:
            assert model_preset_of(name) == name


def test_info_on_a_folder_that_is_not_a_checkpoint(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    code, _, err = run_cli(capsys, "info", "--checkpoint", tmp_path)
    assert_one_line_error(code, err, "is not a checkpoint", "config.json")


# ---------------------------------------------------------------------- generate
def test_generate_greedy_matches_the_library(capsys, checkpoint):
    code, out, err = run_cli(capsys, "generate", "--checkpoint", checkpoint, "--prompt", "To be",
                             "--max-new-tokens", "8")
    assert code == 0 and "new tokens" in err
    model = MiniMaxForCausalLM.from_pretrained(checkpoint)
    tok = ByteTokenizer()
    ids = tok.encode("To be", add_bos=True)
    expected = generate(model, torch.tensor([ids]), max_new_tokens=8, stop_tokens=[tok.eos_id])
    new = expected[0, len(ids):].tolist()
    if tok.eos_id in new:
        new = new[:new.index(tok.eos_id)]
    assert out == tok.decode(new) + "\n"
    code, echoed, _ = run_cli(capsys, "generate", "--checkpoint", checkpoint, "--prompt", "To be",
                              "--max-new-tokens", "8", "--echo")
    assert echoed == "To be" + out


def test_generate_sampling_is_seeded(capsys, checkpoint):
    argv = ["generate", "--checkpoint", checkpoint, "--prompt", "abc", "--max-new-tokens", "8",
            "--temperature", "1.5", "--top-k", "50", "--top-p", "0.95"]
    outs = [run_cli(capsys, *argv, "--seed", s)[1] for s in (1, 1, 2)]
    assert outs[0] == outs[1] != outs[2]


def test_generate_stop_text_cuts_the_output(capsys, checkpoint):
    argv = ["generate", "--checkpoint", checkpoint, "--prompt", "abc", "--max-new-tokens", "10",
            "--temperature", "1.0", "--seed", "3"]
    full = run_cli(capsys, *argv)[1].rstrip("\n")
    assert len(full) >= 4
    stop = full[2:4]
    cut = run_cli(capsys, *argv, "--stop", stop)[1].rstrip("\n")
    assert cut == full[:full.find(stop)]


@pytest.mark.parametrize("extra, fragments", [
    (["--temperature", "-1"], ["--temperature must be >= 0"]),
    (["--top-p", "1.5"], ["--top-p must be in (0, 1]"]),
    (["--top-k", "0"], ["--top-k must be >= 1"]),
    (["--max-new-tokens", "-3"], ["--max-new-tokens"]),
    (["--dtype", "int4"], ["dtype", "'int4'"]),
])
def test_generate_bad_options(capsys, checkpoint, extra, fragments):
    code, _, err = run_cli(capsys, "generate", "--checkpoint", checkpoint, "--prompt", "hi", *extra)
    assert_one_line_error(code, err, *fragments)


def test_generate_missing_checkpoint(capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", "--checkpoint", tmp_path / "none", "--prompt", "hi")
    assert_one_line_error(code, err, "no checkpoint at")
    code, _, err = run_cli(capsys, "generate", "--checkpoint", tmp_path, "--prompt", "hi")
    assert_one_line_error(code, err, "no config.json")


# ---------------------------------------------------------------------- convert
def test_convert_round_trip(capsys, checkpoint, tmp_path):
    hf = tmp_path / "hf"
    code, out, _ = run_cli(capsys, "convert", checkpoint, hf, "--dialect", "hf",
                           "--max-shard-size", "200KB")
    assert code == 0 and "hf dialect" in out
    reader = CheckpointReader(hf)
    assert reader.dialect == "hf" and len(reader.files) > 1
    assert (hf / "tokenizer_config.json").is_file()
    assert json.loads((hf / "config.json").read_text())["model_type"] == "minimax"
    a, b = MiniMaxForCausalLM.from_pretrained(checkpoint), MiniMaxForCausalLM.from_pretrained(hf)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    code, _, err = run_cli(capsys, "convert", checkpoint, hf, "--dialect", "legacy")
    assert_one_line_error(code, err, "not empty")
    code, _, _ = run_cli(capsys, "convert", checkpoint, hf, "--dialect", "legacy", "--overwrite")
    assert code == 0 and CheckpointReader(hf).dialect == "legacy"
    assert not any("-of-" in f for f in os.listdir(hf))  # the old shards are gone


@pytest.mark.parametrize("argv, fragments", [
    (["--dialect", "gguf"], ["--dialect must be legacy or hf"]),
    (["--dialect", "hf", "--max-shard-size", "lots"], ["max_shard_size", "'lots'"]),
    (["--dialect", "hf", "--dtype", "fp8"], ["dtype", "'fp8'"]),
])
def test_convert_errors(capsys, checkpoint, tmp_path, argv, fragments):
    code, _, err = run_cli(capsys, "convert", checkpoint, tmp_path / "out", *argv)
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "out").exists()


def test_convert_missing_source(capsys, tmp_path):
    code, _, err = run_cli(capsys, "convert", tmp_path / "nope", tmp_path / "out", "--dialect", "hf")
    assert_one_line_error(code, err, "no checkpoint at")


# ---------------------------------------------------------------------- a real process
def test_subprocess_entry_point(checkpoint):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    ok = subprocess.run([sys.executable, "-m", "minimax01", "info", "--checkpoint", str(checkpoint)],
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "legacy dialect" in ok.stdout and "Cache memory per sequence" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "minimax01", "info", "--preset", "nope"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: unknown preset 'nope'; model presets: debug, demo, small, 1b, minimax-text-01; "
        "vision-language presets: vl-debug, minimax-vl-01; run presets: debug, demo, vl-demo, 1b-8k"]
