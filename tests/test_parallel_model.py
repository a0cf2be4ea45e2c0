"""The whole model under DistributedWorld (FSDP2, EP with and without token drop, LASP+ and ring
attention under CP, and their combination) == one process on the concatenated batch: loss,
aux loss, MoE drops and every parameter's gradient, with packed documents crossing rank
boundaries (parallel_checks.check_model, here on gloo in float64)."""

from __future__ import annotations

from parallel_checks import check_model
from minimax01.parallel.world import ParallelConfig

from dist_utils import run_workers


def _worker(rank, world, cases):
    for pcfg, cf, pre_shifted, chunk in cases:
        check_model(pcfg, capacity_factor=cf, pre_shifted=pre_shifted, loss_chunk_size=chunk,
                    tol=1e-6)
    if world == 2:  # layers recomputed in backward repeat their collectives
        check_model(ParallelConfig(cp=2, ep=2, ep_token_groups=2), capacity_factor=1.0,
                    checkpointing=True, tol=1e-6)


def test_model_two_processes():
    run_workers(_worker, 2, [(ParallelConfig(dp_shard=2), None, True, 0),
                             (ParallelConfig(ep=2), None, False, 0),
                             (ParallelConfig(ep=2, ep_token_groups=2), 1.0, True, 0),
                             (ParallelConfig(cp=2), None, True, 8),
                             (ParallelConfig(cp=2), None, False, 0),
                             (ParallelConfig(cp=2, ep=2), 1.0, True, 0)])


def test_model_four_processes():
    # 2 data ranks x CP 2, experts over the CP pair, token drop; and EP over all four ranks
    run_workers(_worker, 4, [(ParallelConfig(dp_shard=2, cp=2, ep=2, ep_token_groups=2), 1.0, True, 0),
                             (ParallelConfig(dp_shard=4, ep=4), None, True, 8)])
