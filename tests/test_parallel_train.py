"""End to end: `torchrun -m minimax01 train` on CPU with gloo equals one process, step by step,
and a checkpoint written on 4 ranks (FSDP x CP x EP with token drop) resumes on 2 ranks (another
layout) and continues exactly as the single-process run; the final HF exports agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from minimax01 import MiniMaxForCausalLM
from minimax01.train.config_io import parse_overrides, resolve
from minimax01.train.trainer import Trainer

SHAKESPEARE = "/work/shared/data/tinyshakespeare.txt"
ARGS = ["--train.seq_len", "32", "--train.batch_size", "2", "--train.log_every", "1",
        "--train.eval_every", "0", "--train.sample_tokens", "0", "--train.tensorboard", "false",
        "--train.dtype", "float32", "--train.progress", "false", "--data.source", SHAKESPEARE,
        "--data.eval_fraction", "0", "--optim.warmup_steps", "1", "--model.capacity_factor", "1.0"]


def _losses(out_dir):
    records = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    return {r["step"]: (r["loss"], r["aux_loss"], r["grad_norm"], r["moe_drop_rate"])
            for r in records if "loss" in r}


def _torchrun(nproc, out_dir, steps, *parallel):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), "-m", "minimax01", "train", "--preset", "debug", *ARGS,
           "--train.out_dir", str(out_dir), "--train.steps", str(steps), *parallel]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _close(a, b):
    for x, y in zip(a[:3], b[:3]):
        assert abs(x - y) <= 1e-5 * max(abs(y), 1e-3), (a, b)
    assert a[3] == b[3], (a, b)  # MoE drop rates per layer


def test_torchrun_train_equals_one_process_and_resumes_on_another_layout(tmp_path):
    single = tmp_path / "single"
    cfg = resolve("debug", None, parse_overrides(ARGS + ["--train.out_dir", str(single),
                                                         "--train.steps", "3"]))
    Trainer(cfg).fit()
    ref = _losses(single)
    assert any(rate > 0 for rate in ref[1][3]), "the run meant to drop tokens dropped none"

    run = tmp_path / "run"
    _torchrun(4, run, 2, "--parallel.dp_shard", "2", "--parallel.cp", "2", "--parallel.ep", "2",
              "--parallel.ep_token_groups", "2", "--train.export", "false")
    got = _losses(run)
    assert sorted(got) == [1, 2]
    for step in (1, 2):
        _close(got[step], ref[step])

    log = _torchrun(2, run, 3, "--parallel.ep", "2")  # resume the 4-rank checkpoint on 2 ranks
    assert "resuming from" in log
    got = _losses(run)
    assert sorted(got) == [1, 2, 3]
    _close(got[3], ref[3])

    a = MiniMaxForCausalLM.from_pretrained(single / "model").state_dict()
    b = MiniMaxForCausalLM.from_pretrained(run / "model").state_dict()
    for k in a:  # Adam amplifies rounding where a gradient is near zero: up to ~lr/100
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=5e-5)
