"""Single-process pieces of parallel/: degree resolution and its errors, the mesh shape, the
world factory and the one interface of LocalWorld and DistributedWorld, and cutting a batch
into context-parallel slices."""

from __future__ import annotations

import math

import pytest
import torch

from minimax01.model.model import MiniMaxForCausalLM
from minimax01.parallel.batch import cp_slice, local_cu_seqlens, next_token_targets
from minimax01.parallel.config import check_options as _check_options
from minimax01.parallel.mesh import resolve_layout
from minimax01.parallel.world import LocalWorld, ParallelConfig, make_world


def test_resolve_layout_fills_dp_shard_and_shapes_the_mesh():
    lay = resolve_layout(ParallelConfig(cp=2, ep=4), 8, num_experts=8)
    assert (lay.dp_shard, lay.dp, lay.edp) == (4, 4, 2)
    assert lay.shape == (1, 2, 1, 2, 1, 2)  # EP spans 2 dp_shard ranks x the CP pair
    lay = resolve_layout(ParallelConfig(cp=4, ep=2, dp_replicate=2), 16)
    assert (lay.dp_shard, lay.shape) == (2, (2, 2, 1, 1, 2, 2))  # EP inside a CP group
    assert resolve_layout(ParallelConfig(), 3).shape == (1, 3, 1, 1, 1, 1)


@pytest.mark.parametrize("cfg, world, experts, message", [
    (ParallelConfig(dp_shard=3), 4, None, "world size is 4"),
    (ParallelConfig(cp=3), 4, None, "not divisible by parallel.dp_replicate x parallel.cp = 3"),
    (ParallelConfig(ep=2, cp=3), 6, None, "one must divide the other"),
    (ParallelConfig(ep=4, cp=1, dp_shard=2), 2, None, "must divide dp_shard x cp = 2"),
    (ParallelConfig(ep=4), 4, 6, "number of experts (6)"),
    (ParallelConfig(cp=0), 4, None, "parallel.cp must be a positive integer"),
    (ParallelConfig(ep=4, cp=2, dp_shard=3), 6, None, "must divide dp_shard x cp = 6"),
])
def test_resolve_layout_errors_name_the_bad_value(cfg, world, experts, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_layout(cfg, world, experts)


def test_check_options():
    for field, bad in (("router_scope", "world"), ("param_dtype", "fp8"), ("cp_attention", "x"),
                       ("cp_kernel", "fast"), ("backend", "mpi"), ("ep_token_groups", 0)):
        with pytest.raises(ValueError, match=f"parallel.{field}"):
            _check_options(ParallelConfig(**{field: bad}))


def test_make_world_is_local_in_one_process_and_refuses_parallel_degrees():
    assert isinstance(make_world(ParallelConfig(), "cpu"), LocalWorld)
    with pytest.raises(ValueError, match="torchrun --nproc_per_node"):
        make_world(ParallelConfig(cp=2), "cpu")


def test_cp_slice_matches_the_model_on_the_whole_row():
    """Targets, positions and local cu_seqlens of each slice equal the whole row's, cut."""
    ids = torch.arange(100, 124)[None]
    cu = torch.tensor([0, 5, 14, 15, 24], dtype=torch.int32)
    full_targets = MiniMaxForCausalLM.lm_targets(ids, cu, True)
    pieces = [cp_slice(dict(input_ids=ids, labels=ids, cu_seqlens=cu), r, 3) for r in range(3)]
    assert torch.equal(torch.cat([p["labels"] for p in pieces], 1), full_targets)
    assert all(p["shift_labels"] is False for p in pieces)
    pos = torch.cat([p["position_ids"] for p in pieces], 1)[0].tolist()
    assert pos == [0, 1, 2, 3, 4] + list(range(9)) + [0] + list(range(9))
    assert [p["cu_seqlens"].tolist() for p in pieces] == [[0, 5, 8], [0, 6, 7, 8], [0, 8]]
    # labels that are already targets pass through unshifted
    pre = cp_slice(dict(input_ids=ids, labels=full_targets, cu_seqlens=cu, shift_labels=False), 1, 3)
    assert torch.equal(pre["labels"], full_targets[:, 8:16])
    assert torch.equal(local_cu_seqlens(cu, 8, 16), torch.tensor([0, 6, 7, 8], dtype=torch.int32))
    assert torch.equal(next_token_targets(ids[:, :3]), torch.tensor([[101, 102, -100]]))


def test_cp_slice_errors():
    ids = torch.zeros(1, 10, dtype=torch.long)
    with pytest.raises(ValueError, match="not divisible by parallel.cp=4"):
        cp_slice(dict(input_ids=ids), 0, 4)
    mask = torch.ones(1, 10)
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="pack documents"):
        cp_slice(dict(input_ids=ids, attention_mask=mask), 0, 2)


def _world_members():
    from minimax01.parallel.world import World

    names = set(World.__annotations__) | {n for n in vars(World) if not n.startswith("_")}
    return names - {"_is_protocol"}


def _check_world(world):
    missing = [n for n in sorted(_world_members()) if not hasattr(world, n)]
    assert not missing, f"{type(world).__name__} lacks {missing}"
    t = torch.tensor([3, 4])
    mean = world.all_reduce(t, "mean")
    assert mean.dtype == torch.float64 and mean.tolist() == [3.0, 4.0] and t.tolist() == [3, 4]
    assert world.all_reduce(t, "max").tolist() == [3, 4]
    with pytest.raises(ValueError, match="unknown reduce op"):
        world.all_reduce(t, "prod")
    lin = torch.nn.Linear(2, 1)
    lin.weight.grad, lin.bias.grad = torch.full((1, 2), 3.0), torch.full((1,), 4.0)
    norm = world.clip_grad_norm_(lin.parameters(), 1.0)
    assert type(norm) is torch.Tensor and float(norm) == pytest.approx(math.sqrt(34))
    assert float(lin.weight.grad.norm() ** 2 + lin.bias.grad.norm() ** 2) == pytest.approx(1.0)
    scale = world.loss_scale
    assert scale.gradient_divide_factor == world.world_size
    assert float(scale.rank_loss(torch.tensor(6.0), 3.0, torch.tensor(0.5), micro=2)) == \
        pytest.approx(6.0 * world.world_size / 3 + 0.5 * scale.router_size / 2)


def _world_worker(rank, size):
    world = make_world(ParallelConfig(), "cpu")
    assert type(world).__name__ == "DistributedWorld" and world.world_size == size
    _check_world(world)
    assert world.loss_scale.router_size == size  # router_scope "global"


def test_local_and_distributed_worlds_have_one_interface():
    from dist_utils import run_workers

    _check_world(LocalWorld("cpu"))
    run_workers(_world_worker, 2)
