"""Training config: presets, TOML round trips, command-line overrides and their errors."""

from pathlib import Path

import pytest

from minimax01.cli import main
from minimax01.train.config import RunConfig
from minimax01.train.config_io import (from_preset, load_toml, parse_overrides, resolve,
                                       to_toml)
from minimax01.train.presets import RUN_PRESETS

ROOT = Path(__file__).resolve().parents[1]


def test_config_files_match_presets():
    for name in ("demo", "1b-8k"):
        assert load_toml(ROOT / "configs" / f"{name}.toml") == from_preset(name), name


def test_every_preset_validates_and_round_trips(tmp_path):
    for name in RUN_PRESETS:
        cfg = from_preset(name)
        cfg.validate()
        path = tmp_path / f"{name}.toml"
        path.write_text(to_toml(cfg))
        assert load_toml(path) == cfg


def test_overrides_are_typed_and_applied_in_order():
    cfg = resolve("demo", None, parse_overrides([
        "--train.steps", "7", "--optim.lr=1e-3", "--train.compile", "true",
        "--optim.batch_warmup_tokens", "[1e6, 2e6]", "--train.grad_accum", "4",
        "--train.out_dir", "2024-01-01", "--train.sample_prompt", "123",
        "--model.num_hidden_layers", "2", "--train.steps", "9"]))
    assert cfg.train.steps == 9 and cfg.optim.lr == 1e-3 and cfg.train.compile is True
    assert cfg.optim.batch_warmup_tokens == [1e6, 2e6]
    assert cfg.train.out_dir == "2024-01-01" and cfg.train.sample_prompt == "123"
    model = cfg.validate()
    assert model.num_hidden_layers == 2 and len(model.layer_types) == 2
    assert model.hidden_size == 128  # the rest of the demo preset is kept


@pytest.mark.parametrize("args, message", [
    (["--train.setps", "3"], "unknown config key train.setps; did you mean train.steps?"),
    (["--trian.steps", "3"], "did you mean train?"),
    (["--model.hiden_size", "3"], "did you mean model.hidden_size?"),
    (["--optim.learning_rate", "3"], "unknown config key optim.learning_rate"),
    (["--train.steps", "abc"], "train.steps must be an integer, got 'abc'"),
    (["--train.compile", "yes"], "train.compile must be true or false"),
    (["--train.seq_len", "20000000"], "exceeds the model's max_position_embeddings"),
    (["--train.seq_len", "1"], "train.seq_len must be at least 2"),
    (["--optim.schedule", "step"], "optim.schedule must be"),
    (["--model.preset", "huge"], "unknown model preset 'huge'"),
    (["--optim.batch_warmup_tokens", "[1e6, 2e6]", "--train.grad_accum", "2"],
     "train.grad_accum must be a multiple of 4"),
    (["steps"], "overrides look like --section.key value"),
])
def test_bad_config_is_one_clear_error(args, message):
    with pytest.raises(ValueError, match=None) as err:
        resolve("debug", None, parse_overrides(args)).validate()
    assert message in str(err.value)


def test_unknown_section_in_toml_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[trainer]\nsteps = 3\n")
    with pytest.raises(ValueError, match="unknown config section 'trainer'.*did you mean train"):
        load_toml(path)


def test_cli_typo_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--preset", "debug", "--train.out_dir", str(out), "--train.stpes", "3"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    assert "did you mean train.steps?" in err
    assert not out.exists()


def test_cli_print_config(capsys):
    assert main(["train", "--preset", "demo", "--train.steps", "5", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert "[train]\nsteps = 5\n" in text and 'preset = "demo"' in text


def test_default_config_is_valid():
    RunConfig().validate()


def test_every_shipped_config_parses_and_validates(tmp_path):
    """Every configs/*.toml goes through the schema (configs/ablations/ has its own tests); a
    fine-tuning config's checkpoint is stood in for by a tiny one."""
    from minimax01 import MiniMaxForCausalLM, ModelConfig

    tiny = tmp_path / "ckpt"
    MiniMaxForCausalLM(ModelConfig.from_preset("debug")).save_pretrained(tiny)
    files = sorted((ROOT / "configs").glob("*.toml"))
    assert any(f.name.startswith("finetune-") for f in files)
    for path in files:
        cfg = load_toml(path)
        if cfg.train.init_from:
            cfg.train.init_from = str(tiny)
        cfg.validate()
