"""Training checkpoints against what a crash, a disk or a stranger can leave behind: nothing is
unpickled, damage is found (checksums) and the run falls back to the newest intact checkpoint,
a non-finite state is never saved, a signal is honoured between micro-batches, and metrics.jsonl
never holds a record twice."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal

import pytest

from minimax01.cli import main
from minimax01.train import checkpointing as ckpt
from minimax01.train.config_io import parse_overrides, resolve
from minimax01.train.metrics import read_metrics
from minimax01.train.trainer import Trainer, TrainingDiverged

SHAKESPEARE = "/work/shared/data/tinyshakespeare.txt"
TIMING = {"tokens_per_s", "memory_gib", "mfu"}


def args(out_dir, *extra, **train):
    base = ["--train.out_dir", str(out_dir), "--train.seq_len", "32", "--train.batch_size", "2",
            "--train.export", "false", "--train.sample_tokens", "0", "--train.tensorboard", "false",
            "--train.log_every", "1", "--data.source", SHAKESPEARE, "--data.eval_fraction", "0.05"]
    for k, v in train.items():
        base += [f"--train.{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    return base + list(extra)


def config(out_dir, *extra, **train):
    return resolve("debug", None, parse_overrides(args(out_dir, *extra, **train)))


def records(path):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(path)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of 4 steps with checkpoints at steps 2 and 4 (copied by each test)."""
    out = tmp_path_factory.mktemp("template") / "run"
    Trainer(config(out, steps=4, save_every=2, eval_every=2)).fit()
    return out


def copy(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def step_dir(out, step):
    return ckpt.checkpoint_root(out) / f"step_{step:08d}"


def shard_file(folder):
    return next(p for p in sorted(folder.iterdir()) if p.suffix == ".safetensors")


# ---------------------------------------------------------------------- never unpickle
class Planted:
    def __reduce__(self):  # unpickling this writes the marker file
        return (exec, (f"open({str(MARKER)!r}, 'w').write('pwned')",))


MARKER = None


def test_a_planted_pickle_is_never_loaded(trained, tmp_path):
    global MARKER
    MARKER = tmp_path / "PWNED"
    out = copy(trained, tmp_path)
    payload = pickle.dumps(Planted())
    for folder in (step_dir(out, 4), step_dir(out, 2)):
        (folder / ".metadata").write_bytes(payload)      # DCP's metadata file name
        (folder / "__0_0.distcp").write_bytes(payload)
    old_style = ckpt.checkpoint_root(out) / "step_00000009"  # a DCP folder of an older version
    old_style.mkdir()
    (old_style / ".metadata").write_bytes(payload)
    (old_style / "trainer_state.json").write_text(json.dumps({"step": 9}))
    result = Trainer(config(out, steps=6, save_every=2, eval_every=2)).fit()
    assert result.step == 6 and not MARKER.exists()
    assert (ckpt.checkpoint_root(out) / "damaged-step_00000009").is_dir()
    for f in step_dir(out, 6).iterdir():  # only safetensors and JSON are ever written
        assert f.suffix in (".safetensors", ".json"), f


# ---------------------------------------------------------------------- damage
def _truncate(folder):
    f = shard_file(folder)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _zero(folder):
    f = shard_file(folder)
    f.write_bytes(b"\0" * f.stat().st_size)


def _flip(folder):
    f = shard_file(folder)
    data = bytearray(f.read_bytes())
    data[len(data) * 3 // 4] ^= 0x10  # one bit of one weight
    f.write_bytes(bytes(data))


def _edit_state(folder, change):
    path = folder / "trainer_state.json"
    state = json.loads(path.read_text())
    change(state)
    path.write_text(json.dumps(state))
    manifest = json.loads((folder / "manifest.json").read_text())  # a consistent checksum, so
    from minimax01.checkpoint.sharded import sha256_of  # that only the content check finds it

    manifest["files"]["trainer_state.json"] = {"size": path.stat().st_size,
                                               "sha256": sha256_of(path)}
    (folder / "manifest.json").write_text(json.dumps(manifest))


DAMAGE = {
    "truncated shard": (_truncate, "bytes, the manifest says"),
    "zeroed shard": (_zero, "does not match its checksum"),
    "one flipped bit": (_flip, "does not match its checksum"),
    "missing shard": (lambda f: shard_file(f).unlink(), "is missing"),
    "missing manifest": (lambda f: (f / "manifest.json").unlink(), "manifest.json is missing"),
    "garbage manifest": (lambda f: (f / "manifest.json").write_bytes(b"\x89PNG\0\0garbage"),
                         "manifest.json is not valid JSON"),
    "manifest naming ../": (lambda f: (f / "manifest.json").write_text(json.dumps(
        {**json.loads((f / "manifest.json").read_text()),
         "files": {"../../etc/passwd": {"size": 1, "sha256": "0"}}})), "outside the folder"),
    "bad JSON state": (lambda f: (f / "trainer_state.json").write_text("{'step': 4"),
                       "trainer_state.json has"),
    "state without a step": (lambda f: _edit_state(f, lambda s: s.pop("step")),
                             "'step' is missing or not a valid int"),
    "missing rank index": (lambda f: (f / "shard-00000.json").unlink(), "shard-00000.json is missing"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damage_is_found_and_named(trained, tmp_path, kind):
    from minimax01.parallel.world import LocalWorld

    damage, why = DAMAGE[kind]
    out = copy(trained, tmp_path)
    damage(step_dir(out, 4))
    resume, damaged = ckpt.find_resumable(out, LocalWorld("cpu"))
    assert resume == step_dir(out, 2)
    assert [p for p, _ in damaged] == [step_dir(out, 4)] and why in damaged[0][1], damaged


def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact(trained, tmp_path, capsys):
    out = copy(trained, tmp_path)
    _flip(step_dir(out, 4))
    trainer = Trainer(config(out, steps=5, save_every=2, eval_every=2))
    assert trainer.resume_from == step_dir(out, 2)
    result = trainer.fit()
    assert result.step == 5
    err = capsys.readouterr().err
    warning = next(line for line in err.splitlines() if line.startswith("warning: checkpoint"))
    assert "step_00000004 is damaged" in warning and "checksum" in warning, warning
    assert "resumes from step_00000002" in warning
    assert (ckpt.checkpoint_root(out) / "damaged-step_00000004").is_dir()
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5]  # steps 3 and 4 were trained again, and logged once


def test_no_intact_checkpoint_is_an_error_not_a_restart(trained, tmp_path, capsys):
    out = copy(trained, tmp_path)
    _flip(step_dir(out, 4))
    (step_dir(out, 2) / "manifest.json").unlink()
    before = (out / "metrics.jsonl").read_bytes()
    rc = main(["train", "--preset", "debug"] + args(out, steps=6))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and err.startswith("error: no intact checkpoint"), err
    assert "step_00000004: " in err and "step_00000002: manifest.json is missing" in err
    assert (out / "metrics.jsonl").read_bytes() == before  # nothing was touched
    assert step_dir(out, 4).is_dir()


def test_resharded_checkpoint_files_are_checked_by_every_rank_share(trained):
    """verify() splits the checksum work: each part checks its own files, together all."""
    folder = step_dir(trained, 4)
    files = json.loads((folder / "manifest.json").read_text())["files"]
    assert {"trainer_state.json", "rng_rank0.json", "shard-00000.json"} <= set(files)
    assert all(ckpt.verify(folder, part, 3) is None for part in range(3))


# ---------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("key, value, message", [
    ("lr", "inf", "optim.lr must be a positive finite number"),
    ("lr", "nan", "optim.lr must be a positive finite number"),
    ("lr", "0", "optim.lr must be a positive finite number"),
    ("beta1", "1.0", "optim.beta1 must be in [0, 1)"),
    ("beta2", "-0.5", "optim.beta2 must be in [0, 1)"),
    ("beta2", "nan", "optim.beta2 must be in [0, 1)"),
    ("eps", "0", "optim.eps must be a positive finite number"),
    ("eps", "inf", "optim.eps must be a positive finite number"),
    ("grad_clip", "inf", "optim.grad_clip must be a finite number >= 0"),
    ("grad_clip", "-1", "optim.grad_clip must be a finite number >= 0"),
    ("weight_decay", "-0.1", "optim.weight_decay must be a finite number >= 0"),
    ("weight_decay", "nan", "optim.weight_decay must be a finite number >= 0"),
    ("min_lr_ratio", "nan", "optim.min_lr_ratio must be in [0, 1]"),
])
def test_optimizer_values_are_checked_before_anything_is_written(tmp_path, capsys, key, value,
                                                                  message):
    out = tmp_path / "never"
    rc = main(["train", "--preset", "debug"] + args(out, f"--optim.{key}", value))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and message in err, err
    assert not out.exists()


class Poisoned(Trainer):
    """Turns one weight into NaN after the optimizer step of step `at` (a diverged update)."""

    at = 3

    def _step(self, model, raw_model, optimizer, *rest):
        done = super()._step(model, raw_model, optimizer, *rest)
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.at:
            with __import__("torch").no_grad():
                next(model.parameters()).view(-1)[0] = float("nan")
        return done


def test_a_non_finite_model_is_never_saved(tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match=r"NaN or inf at step 3: not saved.*step_00000002"):
        Poisoned(config(out, steps=6, save_every=1, eval_every=0)).fit()
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1, 2]
    resumed = Trainer(config(out, steps=3, save_every=1, eval_every=0)).fit()  # from step 2
    assert resumed.step == 3


# ---------------------------------------------------------------------- signals
class Interrupted(Trainer):
    """Sends itself SIGTERM during forward number `at` (a step of several micro-batches)."""

    at = None

    def _forward(self, model, batch):
        self.forwards = getattr(self, "forwards", 0) + 1
        if model.training and self.forwards == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super()._forward(model, batch)


def test_sigterm_is_honoured_between_micro_batches_and_resumes_exactly(tmp_path):
    common = dict(steps=3, grad_accum=3, save_every=0, eval_every=0)
    Trainer(config(tmp_path / "ref", **common)).fit()
    trainer = Interrupted(config(tmp_path / "cut", **common))
    trainer.at = 3 + 2  # the 2nd micro-batch of step 2
    result = trainer.fit()
    assert result.stopped_by_signal == signal.SIGTERM and result.step == 1
    assert trainer.forwards == 3 + 2  # the last micro-batch of step 2 never ran
    assert ckpt.read_state(ckpt.latest_checkpoint(tmp_path / "cut"))["step"] == 1
    Trainer(config(tmp_path / "cut", **common)).fit()
    assert records(tmp_path / "cut/metrics.jsonl") == records(tmp_path / "ref/metrics.jsonl")


def test_cli_exit_status_after_sigterm(tmp_path, monkeypatch):
    monkeypatch.setattr("minimax01.train.trainer.Trainer", Interrupted)
    Interrupted.at = 3
    try:
        rc = main(["train", "--preset", "debug"] + args(tmp_path / "t", steps=5, grad_accum=2))
    finally:
        Interrupted.at = None
    assert rc == 128 + signal.SIGTERM
    assert ckpt.read_state(ckpt.latest_checkpoint(tmp_path / "t"))["step"] == 1


# ---------------------------------------------------------------------- metrics
class CrashesInExport(Trainer):
    def export(self, model, log):
        raise RuntimeError("killed while exporting")


def test_metrics_never_hold_a_record_twice(tmp_path):
    out = tmp_path / "m"
    ref = tmp_path / "ref"
    Trainer(config(ref, steps=4, save_every=2, eval_every=2)).fit()
    expect = records(ref / "metrics.jsonl")
    # killed after the final checkpoint, while exporting: the re-run logs nothing twice
    with pytest.raises(RuntimeError, match="exporting"):
        CrashesInExport(config(out, steps=4, save_every=2, eval_every=2)).fit()
    Trainer(config(out, steps=4, save_every=2, eval_every=2)).fit()
    assert records(out / "metrics.jsonl") == expect
    # a finished run started again: nothing new, nothing twice
    Trainer(config(out, steps=4, save_every=2, eval_every=2)).fit()
    assert records(out / "metrics.jsonl") == expect
    # records of a run killed before its first checkpoint are dropped by the fresh start
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "metrics.jsonl").write_text('{"step": 0, "eval_loss": 1.0}\n{"step": 1, "loss": 2')
    Trainer(config(fresh, steps=4, save_every=2, eval_every=2)).fit()
    assert records(fresh / "metrics.jsonl") == expect


# ---------------------------------------------------------------------- one-line errors
def _file(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    return f


@pytest.mark.parametrize("make, extra, message", [
    (lambda t: _file(t), [], "exists and is not a folder"),
    (lambda t: _file(t) / "sub", [], "is a file, not a folder"),
    (lambda t: t / "o", ["--model.initializer_range", "-1"], "initializer_range: must be positive"),
    (lambda t: t / "o", ["--model.initializer_range", "nan"], "initializer_range: must be finite"),
    (lambda t: t / "o", ["--model.block_size", "1.5"], "model.block_size must be an integer"),
    (lambda t: t / "o", ["--model.rope_theta", "inf"], "rope_theta: must be finite"),
    (lambda t: t / "o", ["--model.num_hidden_layers", "5000"], "must be an integer in [1, 1024]"),
    (lambda t: t / "o", ["--model.dtype", "int8"], "dtype: must be one of float32"),
    (lambda t: t / "o", ["--train.device", "tpu"], "train.device must be auto, cpu, cuda"),
    (lambda t: t / "o", ["--data.eval_fraction", "nan"], "data.eval_fraction must be in [0, 1)"),
])
def test_cli_failures_are_one_line(tmp_path, capsys, make, extra, message):
    out = make(tmp_path)
    rc = main(["train", "--preset", "debug"] + args(out, *extra))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and message in err, err
    assert not (tmp_path / "o").exists()


def test_cuda_device_without_cuda_is_one_line(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc = main(["train", "--preset", "debug"] + args(tmp_path / "o", "--train.device", "cuda"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == "error: train.device cuda: CUDA is not available on this machine " \
                              "(use cpu or auto)"
    assert not (tmp_path / "o").exists()


def test_unwritable_out_dir(tmp_path, capsys, monkeypatch):
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else
                        real(p, mode))  # (the tests run as root, whom chmod does not stop)
    rc = main(["train", "--preset", "debug"] + args(tmp_path / "o"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "cannot be created" in err and "is not writable" in err, err


def test_unreadable_tokenizer_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "tokenizer.json"
    bad.write_bytes(b"\xff\xfe not a tokenizer")
    rc = main(["train", "--preset", "debug"] + args(tmp_path / "o", "--data.tokenizer", str(bad)))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "data.tokenizer" in err and "cannot read" in err
    assert not (tmp_path / "o").exists()
