"""The whole model under DistributedWorld (FSDP2, EP with and without token drop, LASP+ and ring
attention under CP, and their combination) == one process on the concatenated batch: loss,
aux loss and every parameter's gradient, with packed documents crossing rank boundaries."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from minimax01.config import ModelConfig
from minimax01.model.model import MiniMaxForCausalLM
from minimax01.parallel.batch import next_token_targets
from minimax01.parallel.world import ParallelConfig, make_world

from dist_utils import run_workers

SEQ = 24
DOCS = [0, 5, 14, 15]  # document starts inside each packed row (cross the CP boundary at 12)


def _model(capacity_factor=None):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug", capacity_factor=capacity_factor,
                                  router_aux_loss_coef=0.01)
    return MiniMaxForCausalLM(cfg).double().train()


def _batch(rows):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (rows, SEQ), generator=g)
    labels = ids.clone()
    labels[:, 7] = -100  # an ignored target
    cu = torch.tensor(DOCS + [SEQ], dtype=torch.int32)
    return ids, labels, cu


def _reference(rows, capacity_factor):
    """One process, all rows packed into one long row (documents never cross rows)."""
    model = _model(capacity_factor)
    ids, labels, cu = _batch(rows)
    cu_all = torch.cat([cu[:-1] + r * SEQ for r in range(rows)] + [cu[-1:] * rows]).to(torch.int32)
    out = model(ids.reshape(1, -1), labels=labels.reshape(1, -1), cu_seqlens=cu_all)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out, grads, [s.dropped for s in model.moe_stats()]


def _worker(rank, world, cases):
    for pcfg, cf, pre_shifted in cases:
        world_ = make_world(pcfg)
        ref, ref_grads, ref_dropped = _reference(world_.dp_size, cf)
        model = world_.parallelize(_model(cf))
        ids, labels, cu = _batch(world_.dp_size)
        mine = slice(world_.dp_rank, world_.dp_rank + 1)
        batch = dict(input_ids=ids[mine], labels=labels[mine], cu_seqlens=cu)
        if pre_shifted:  # the trainer's convention: labels are next-token targets already
            batch.update(labels=next_token_targets(labels[mine], cu), shift_labels=False)
        local = world_.shard_batch(batch)
        out = model(**local)
        # the loss every rank backpropagates: W * token sum / global target count + aux
        n = local["labels"].ne(-100).sum() if not local.get("shift_labels", True) else \
            next_token_targets(local["labels"], local.get("cu_seqlens")).ne(-100).sum()
        n_global = world_.all_reduce(n, "sum")
        loss = out.lm_loss * n * (world_.world_size / n_global) + out.aux_loss
        loss.backward()
        torch.testing.assert_close(world_.all_reduce(loss.detach(), "mean"), ref.loss.detach(),
                                   rtol=1e-6, atol=1e-8)
        aux = world_.all_reduce(out.aux_loss.detach(), "mean")
        torch.testing.assert_close(aux, ref.aux_loss.detach(), rtol=1e-6, atol=1e-10)
        assert [s.dropped for s in model.moe_stats()] == ref_dropped
        assert (sum(ref_dropped) > 0) == (cf is not None)
        for name, p in model.named_parameters():
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-9,
                                       msg=lambda m: f"{pcfg} {name}: {m}")
        dist.barrier()


def test_model_two_processes():
    run_workers(_worker, 2, [(ParallelConfig(dp_shard=2), None, True),
                             (ParallelConfig(ep=2), None, False),
                             (ParallelConfig(ep=2, ep_token_groups=2), 1.0, True),
                             (ParallelConfig(cp=2), None, True),
                             (ParallelConfig(cp=2), None, False),
                             (ParallelConfig(cp=2, ep=2), 1.0, True)])


def test_model_four_processes():
    # 2 data ranks x CP 2, experts over the CP pair, token drop; and EP over all four ranks
    run_workers(_worker, 4, [(ParallelConfig(dp_shard=2, cp=2, ep=2, ep_token_groups=2), 1.0, True),
                             (ParallelConfig(dp_shard=4, ep=4), None, True)])
