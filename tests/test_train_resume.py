"""Checkpoints survive kills: a run killed with SIGKILL and resumed by the same command gives the
same losses, step by step, as an uninterrupted run; SIGTERM saves a checkpoint and exits 143.

Runs happen in forked child processes (torch is already imported, so each starts at once), each
with one thread so that the runs are bit-for-bit comparable."""

import multiprocessing as mp
import os
import signal
import time

import torch

from minimax01.cli import main
from minimax01.train import checkpointing as ckpt
from minimax01.train.metrics import read_metrics

SHAKESPEARE = "/work/shared/data/tinyshakespeare.txt"
TIMING_KEYS = {"tokens_per_s", "memory_gib", "mfu"}


def command(out_dir, steps=14):
    return ["train", "--preset", "debug", "--train.out_dir", str(out_dir),
            "--train.steps", str(steps), "--train.seq_len", "32", "--train.batch_size", "2",
            "--train.save_every", "4", "--train.log_every", "1", "--train.eval_every", "5",
            "--train.export", "false", "--train.sample_tokens", "0",
            "--train.tensorboard", "false", "--data.source", SHAKESPEARE,
            "--data.eval_fraction", "0.05", "--optim.schedule", "cosine",
            "--optim.warmup_steps", "3"]


def _child(argv):
    torch.set_num_threads(1)
    os._exit(main(argv))


def start(argv):
    proc = mp.get_context("fork").Process(target=_child, args=(argv,))
    proc.start()
    return proc


def wait_for(predicate, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.is_alive(), "the run ended before the moment it was meant to be stopped at"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def comparable(path):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(path)]


def test_kill_9_then_resume_equals_uninterrupted_run(tmp_path):
    ref = start(command(tmp_path / "ref"))
    ref.join()
    assert ref.exitcode == 0
    out = tmp_path / "killed"
    run = start(command(out))
    wait_for(lambda: (ckpt.checkpoint_root(out) / "step_00000004").exists(), run)
    os.kill(run.pid, signal.SIGKILL)
    run.join()
    assert run.exitcode == -signal.SIGKILL
    steps_logged = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert steps_logged and max(steps_logged) >= 4
    resumed = start(command(out))  # the very same command
    resumed.join()
    assert resumed.exitcode == 0
    expect, got = comparable(tmp_path / "ref/metrics.jsonl"), comparable(out / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in expect]
    for a, b in zip(expect, got):
        assert a == b  # losses, grad norms, learning rates, tokens, held-out losses: identical


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path):
    out = tmp_path / "term"
    run = start(command(out, steps=1000))

    def logged_step():
        path = out / "metrics.jsonl"
        return path.is_file() and any(r.get("step", 0) >= 2 for r in read_metrics(path))

    wait_for(logged_step, run)
    os.kill(run.pid, signal.SIGTERM)
    run.join(timeout=120)
    assert run.exitcode == 128 + signal.SIGTERM
    last = max(r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r)
    saved = ckpt.latest_checkpoint(out)
    assert ckpt.read_state(saved)["step"] == last
    resumed = start(command(out, steps=last + 1))
    resumed.join()
    assert resumed.exitcode == 0
    assert ckpt.read_state(ckpt.latest_checkpoint(out))["step"] == last + 1
