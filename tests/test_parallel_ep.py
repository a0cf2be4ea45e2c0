"""Expert-parallel MoE (global router, token drop, all-to-all, token groups: the expert-parallel
configuration of the MoE pipeline) == one process running the MoE block on the concatenated
batch: outputs, aux loss, stats and gradients."""

from __future__ import annotations

import torch
import torch.distributed as dist

from minimax01.config import ModelConfig
from minimax01.model.layers import MoE
from minimax01.parallel.expert_parallel import EPGroup, expert_parallel_pipeline, router_group
from minimax01.parallel.scaling import LossScale

from dist_utils import run_workers

E, HID, INTER = 4, 8, 6


def _moe(cf, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=HID, intermediate_size=INTER, num_local_experts=E,
                      num_experts_per_tok=2, capacity_factor=cf)
    moe = MoE(cfg).double()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.5)
    return moe.train()


def _groups(world, ep):
    """EP groups of consecutive ranks; every rank creates every group (collective call)."""
    mine = None
    for start in range(0, world, ep):
        g = dist.new_group(list(range(start, start + ep)))
        if start <= dist.get_rank() < start + ep:
            mine = g
    edp = None
    for j in range(ep):
        g = dist.new_group(list(range(j, world, ep)))
        if dist.get_rank() % ep == j:
            edp = g
    return mine, edp


def _router(world, scope):
    """Router groups: consecutive blocks of `scope` ranks (every rank creates every group)."""
    mine = None
    for start in range(0, world, scope):
        g = dist.new_group(list(range(start, start + scope))) if scope < world else dist.group.WORLD
        if start <= dist.get_rank() < start + scope:
            mine = g
    return mine


def _worker(rank, world, cases):
    for cf, ep, cp, rows, groups, tokens, *rest in cases:
        scope = rest[0] if rest else world  # router group size
        n_groups = world // scope
        x = torch.randn(world // cp * rows, tokens * cp, HID, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(1))
        upstream = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        # reference: one process per router group on that group's rows; the aux loss of a step is
        # the mean over groups (like gradient-accumulation steps)
        ref = _moe(cf)
        xr = x.clone().requires_grad_()
        span = scope // cp * rows
        outs, auxes = [], []
        for grp in range(n_groups):
            o, a = ref(xr[grp * span:(grp + 1) * span])
            outs.append(o)
            auxes.append(a)
            if grp == rank // scope:
                ref_stats = ref.last_stats  # this rank's group
        out_ref, aux_ref = torch.cat(outs), torch.stack(auxes).mean()
        ((out_ref * upstream).sum() + aux_ref).backward()

        moe = _moe(cf)
        ep_group, edp_group = _groups(world, ep)
        per = E // ep
        j = rank % ep
        with torch.no_grad():
            moe.experts.gate_up_proj = torch.nn.Parameter(moe.experts.gate_up_proj[j * per:(j + 1) * per].clone())
            moe.experts.down_proj = torch.nn.Parameter(moe.experts.down_proj[j * per:(j + 1) * per].clone())
        router = router_group(_router(world, scope), scope, cp, rank % scope)
        moe.pipeline = expert_parallel_pipeline(router, EPGroup(ep_group, ep, j), groups)
        scale = LossScale(world, scope)
        d, c = divmod(rank, cp)
        sl = (slice(d * rows, (d + 1) * rows), slice(c * tokens, (c + 1) * tokens))
        xl = x[sl].clone().requires_grad_()
        out, aux = moe(xl)
        torch.testing.assert_close(out, out_ref[sl].detach(), rtol=1e-10, atol=1e-10)
        aux_sum = aux.detach().clone()
        dist.all_reduce(aux_sum)  # the ranks' shares of their router groups' losses
        torch.testing.assert_close(scale.mean_aux(aux_sum), aux_ref.detach(), rtol=1e-6, atol=1e-8)
        stats = moe.last_stats
        assert stats.dropped == ref_stats.dropped and stats.assignments == ref_stats.assignments
        if cf is not None and cf < 1.5:
            assert stats.dropped > 0, "the case meant to drop tokens dropped none"
        torch.testing.assert_close(stats.load, ref_stats.load.to(stats.load.dtype))
        ((out * upstream[sl]).sum() + scale.rank_loss(0, 1, aux) / world).backward()
        torch.testing.assert_close(xl.grad, xr.grad[sl], rtol=1e-6, atol=1e-8)  # router math is fp32
        gate = moe.gate.weight.grad.clone()
        dist.all_reduce(gate)
        torch.testing.assert_close(gate, ref.gate.weight.grad, rtol=1e-6, atol=1e-8)
        for name in ("gate_up_proj", "down_proj"):
            g = getattr(moe.experts, name).grad.clone()
            dist.all_reduce(g, group=edp_group)
            torch.testing.assert_close(g, getattr(ref.experts, name).grad[j * per:(j + 1) * per],
                                       rtol=1e-6, atol=1e-8)


def test_expert_parallel_two_processes():
    # (capacity_factor, ep, cp, rows, token_groups, tokens per rank-row)
    run_workers(_worker, 2, [(None, 2, 1, 2, 1, 5),     # dropless EP
                             (1.0, 2, 1, 2, 1, 7),      # token drop, global capacity
                             (1.0, 2, 1, 1, 3, 9),      # token drop + overlap groups
                             (0.75, 1, 1, 2, 1, 6),     # no EP: global router only
                             (1.0, 2, 2, 1, 2, 6)])     # EP over the CP pair


def test_expert_parallel_four_processes():
    run_workers(_worker, 4, [(1.0, 2, 2, 2, 2, 5),      # 2 data ranks x CP 2, EP inside CP
                             (0.5, 4, 1, 1, 3, 6),      # EP over all four, heavy drop
                             (1.0, 2, 2, 2, 2, 5, 2),   # router scope "local": the CP pair
                             (1.0, 2, 1, 1, 1, 9, 2)])  # router scope "ep": the EP pair
