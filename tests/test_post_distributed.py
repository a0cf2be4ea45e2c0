"""DPO on two gloo processes equals one process: data parallel (FSDP2, pairs split over ranks;
with the chunked per-token log-probs, against the full logits of one process) and context parallel (each pair's tokens split over two ranks, LASP+ / ring attention, the
per-sequence log-prob sums all-reduced over the CP group with the gradient reaching each rank's
own positions once)."""

import pytest
import torch

from dist_utils import run_workers
from minimax01.train.config_io import set_value
from minimax01.train.metrics import read_metrics
from minimax01.train.objectives import make_trainer
from minimax01.train.post.demo import dpo_config

KEYS = ("loss", "margin", "accuracy", "chosen_reward", "rejected_reward", "grad_norm",
        "eval_loss", "eval_accuracy")


def config(work, **parallel):
    cfg = dpo_config(work, steps=3, pairs=120, eval_every=3)
    for key, value in {"train.batch_size": 2, "train.eval_batches": 2, **parallel}.items():
        set_value(cfg, key, value)
    return cfg


def _train(rank, world_size, work, parallel):
    make_trainer(config(work, **parallel)).fit()


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [{"parallel.dp_shard": 2, "train.loss_chunk_size": 16},
                                      {"parallel.cp": 2}], ids=["dp2-chunked", "cp2"])
def test_dpo_on_two_ranks_equals_one_process(tmp_path, parallel):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        make_trainer(config(tmp_path / "one")).fit()
        run_workers(_train, 2, tmp_path / "two", parallel)
    finally:
        torch.set_num_threads(threads)
    one = read_metrics(tmp_path / "one/run/metrics.jsonl")
    two = read_metrics(tmp_path / "two/run/metrics.jsonl")
    assert [r["step"] for r in two] == [r["step"] for r in one]
    assert sum("margin" in r for r in one) == 3
    for a, b in zip(one, two):
        for key in KEYS:
            if key in a:
                # rewards are beta x (differences of ~-12 log-prob sums): fp32 rounding ~1e-6
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)
