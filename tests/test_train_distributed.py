"""The trainer under two data-parallel processes (gloo, FSDP2 through DistributedWorld) computes
what one process computes, and a checkpoint written by two ranks resumes in one."""

import pytest
import torch

from dist_utils import run_workers
from minimax01.train.config_io import parse_overrides, resolve
from minimax01.train.metrics import read_metrics
from minimax01.train.trainer import Trainer

SHAKESPEARE = "/work/shared/data/tinyshakespeare.txt"
TIMING_KEYS = {"tokens_per_s", "memory_gib", "mfu"}


def config(out_dir, steps, *extra):
    return resolve("debug", None, parse_overrides(list(extra) + [
        "--train.out_dir", str(out_dir), "--train.seq_len", "32", "--train.batch_size", "4",
        "--train.steps", str(steps), "--train.log_every", "1", "--train.eval_every", "2",
        "--train.save_every", "2", "--train.export", "false", "--train.sample_tokens", "0",
        "--train.tensorboard", "false", "--data.source", SHAKESPEARE,
        "--data.eval_fraction", "0.05"]))


def _train(rank, world_size, out_dir, steps):
    Trainer(config(out_dir, steps)).fit()


def records(path):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(path)]


@pytest.mark.slow
def test_two_data_parallel_ranks_match_one_process_and_resume_in_one(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(config(tmp_path / "one", 4)).fit()
        run_workers(_train, 2, tmp_path / "two", 4)
        run_workers(_train, 2, tmp_path / "resharded", 2)   # two ranks save at step 2 ...
        Trainer(config(tmp_path / "resharded", 4)).fit()    # ... one process resumes
    finally:
        torch.set_num_threads(threads)
    one = records(tmp_path / "one/metrics.jsonl")
    for other in ("two", "resharded"):
        got = records(tmp_path / other / "metrics.jsonl")
        assert [r["step"] for r in got] == [r["step"] for r in one]
        for a, b in zip(one, got):
            assert a.keys() == b.keys()
            for key in ("loss", "eval_loss", "grad_norm", "aux_loss", "lr", "tokens"):
                if key in a:
                    assert b[key] == pytest.approx(a[key], rel=2e-6), (other, a["step"], key)
            if "moe_load" in a:
                for x, y in zip(a["moe_load"], b["moe_load"]):
                    assert y == pytest.approx(x, abs=1e-4)


def _sigterm_one_rank(rank, world_size, out_dir, steps):
    """Rank 1 alone gets SIGTERM, during the 1st micro-batch of step 2; every rank must stop at
    that micro-batch boundary, save step 1 together and exit."""
    import os
    import signal

    class Once(Trainer):
        forwards = 0

        def _forward(self, model, batch):
            self.forwards += model.training
            if rank == 1 and model.training and self.forwards == 2 + 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return super()._forward(model, batch)

    result = Once(config(out_dir, steps, "--train.grad_accum", "2")).fit()
    assert result.stopped_by_signal == signal.SIGTERM and result.step == 1, result


@pytest.mark.slow
def test_sigterm_on_one_rank_stops_every_rank_between_micro_batches(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(config(tmp_path / "ref", 3, "--train.grad_accum", "2")).fit()
        run_workers(_sigterm_one_rank, 2, tmp_path / "cut", 3)
        Trainer(config(tmp_path / "cut", 3, "--train.grad_accum", "2")).fit()  # resumes at 1
    finally:
        torch.set_num_threads(threads)
    ref, got = records(tmp_path / "ref/metrics.jsonl"), records(tmp_path / "cut/metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for a, b in zip(ref, got):
        for key in ("loss", "eval_loss", "grad_norm", "lr", "tokens"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=2e-6), (a["step"], key)
