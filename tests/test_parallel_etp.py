"""Expert tensor parallelism (parallel.etp): the model with every expert's intermediate dim split
over an ETP group -- alone, with EP (token drop, two token groups), with FSDP over the
expert-data-parallel ranks and with CP -- equals one process (parallel_checks.check_model:
loss, aux loss, drops, every gradient); and checkpoints reshard into and out of ETP layouts
(gate_up_proj's slices are two boxes of the global tensor)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from minimax01.parallel import checkpoint as pckpt
from minimax01.parallel.mesh import resolve_layout
from minimax01.parallel.world import ParallelConfig, make_world
from parallel_checks import check_model
from test_parallel_checkpoint import _check_same, _full_optim, _model, _optimizer, _train_step

from dist_utils import run_workers


def _model_worker(rank, world, cases):
    for pcfg, cf in cases:
        check_model(pcfg, capacity_factor=cf, tol=1e-6)


def test_etp_equals_one_process():
    run_workers(_model_worker, 4, [
        (ParallelConfig(ep=2, etp=2, ep_token_groups=2), 1.0),  # EP x ETP, token drop
        (ParallelConfig(dp_shard=4, etp=2), None),              # ETP inside FSDP (edp 2)
        (ParallelConfig(cp=2, etp=2), None),                    # ETP x CP
    ])


def _reshard_worker(rank, size, folder):
    world = make_world(ParallelConfig(ep=2, etp=2))
    model = world.parallelize(_model(1))  # other weights until loaded
    opt = _optimizer(model)
    _train_step(model, opt, world)        # creates the optimizer state
    pckpt.load(f"{folder}/plain", model, opt)  # one process -> EP x ETP
    full, optim = pckpt.full_state_dict(model), _full_optim(model, opt)
    if rank == 0:
        _check_same(full, optim, torch.load(f"{folder}/plain.pt"))
    _train_step(model, opt, world)
    pckpt.save(f"{folder}/etp", model, opt)
    full, optim = pckpt.full_state_dict(model), _full_optim(model, opt)
    if rank == 0:
        torch.save({"model": full, "optim": optim}, f"{folder}/etp.pt")
    dist.barrier()


def test_checkpoint_reshards_into_and_out_of_etp(tmp_path):
    model = _model(0)
    opt = _optimizer(model)
    _train_step(model, opt, make_world())
    pckpt.save(tmp_path / "plain", model, opt)
    torch.save({"model": model.state_dict(), "optim": _full_optim(model, opt)},
               tmp_path / "plain.pt")
    run_workers(_reshard_worker, 4, str(tmp_path))
    model = _model(2)
    opt = _optimizer(model)
    pckpt.load(tmp_path / "etp", model, opt)  # EP x ETP -> one process
    ref = torch.load(tmp_path / "etp.pt")
    _check_same(model.state_dict(), _full_optim(model, opt), ref)
    assert not torch.equal(ref["model"]["model.layers.0.mlp.experts.gate_up_proj"],
                           torch.load(tmp_path / "plain.pt")["model"][
                               "model.layers.0.mlp.experts.gate_up_proj"])  # it trained


@pytest.mark.parametrize("cfg, world, message", [
    (ParallelConfig(etp=0), 4, "parallel.etp must be a positive integer"),
    (ParallelConfig(etp=3), 4, "parallel.etp=3 x the 1 dp_shard rank(s)"),
    (ParallelConfig(ep=2, etp=2), 2, "parallel.etp=2 x the 2 dp_shard rank(s)"),
    (ParallelConfig(etp=4), 4, "expert intermediate size (6)"),
])
def test_etp_layout_errors_name_the_field(cfg, world, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_layout(cfg, world, num_experts=4, intermediate_size=6)


def test_etp_mesh_shape():
    lay = resolve_layout(ParallelConfig(ep=2, etp=2, cp=2), 16, num_experts=4)
    assert (lay.dp_shard, lay.edp, lay.shape) == (8, 4, (1, 4, 2, 1, 1, 2))
