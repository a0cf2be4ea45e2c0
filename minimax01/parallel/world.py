"""The seam between a training loop and parallelism: the `World`.

A world says where this process sits (ranks, data-parallel and context-parallel index, the
mesh), cuts a data-parallel rank's batch into this rank's slice, reduces numbers and gradient
norms over ranks, and knows how losses are scaled (`loss_scale`, parallel/scaling.py). It does
not change a model: `parallelize(model, world, cfg)` (parallelize.py) does that, from outside.

`LocalWorld` (one process) and `DistributedWorld` (distributed.py: a process group and one
DeviceMesh) have the same interface, `World`, so a loop never asks which one it has.
`make_world` picks one from the environment (torchrun sets WORLD_SIZE)."""

from __future__ import annotations

import os
from typing import Protocol

import torch

from .config import ROUTER_SCOPES, ParallelConfig, check_reduce_op  # noqa: F401  (old home)
from .scaling import LossScale


class World(Protocol):
    """What every world provides (tests/test_parallel_layout.py checks both worlds have it)."""

    cfg: ParallelConfig
    device: torch.device
    rank: int
    world_size: int
    dp_rank: int            # which rows this rank reads (ranks of a CP group share rows)
    dp_size: int
    cp_rank: int
    cp_size: int
    is_main: bool
    mesh: object | None     # the ParallelMesh (None in one process)
    loss_scale: LossScale

    def parallelize(self, model: torch.nn.Module) -> torch.nn.Module:
        """`parallelize(model, self, self.cfg)`."""

    def shard_batch(self, batch: dict) -> dict:
        """This rank's slice of a data-parallel rank's batch (identity without CP)."""

    def all_reduce(self, value: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """A new tensor on value's device, reduced over every rank ("sum", "mean", "max",
        "min"; "mean" of integers is float64)."""

    def clip_grad_norm_(self, parameters, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """The global gradient norm (a plain tensor), after clipping in place."""

    def barrier(self) -> None: ...

    def shutdown(self) -> None: ...


class LocalWorld:
    """One process, one device: reductions over one rank, no mesh."""

    rank = 0
    world_size = 1
    dp_rank, dp_size = 0, 1
    cp_rank, cp_size = 0, 1
    is_main = True
    mesh = None
    loss_scale = LossScale()

    def __init__(self, device: torch.device | str | None = None, cfg: ParallelConfig | None = None):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.cfg = cfg or ParallelConfig()

    def parallelize(self, model: torch.nn.Module) -> torch.nn.Module:
        from .parallelize import parallelize

        return parallelize(model, self, self.cfg)

    def shard_batch(self, batch: dict) -> dict:
        return batch

    def all_reduce(self, value: torch.Tensor, op: str = "sum") -> torch.Tensor:
        check_reduce_op(op)
        t = torch.as_tensor(value).detach().clone()
        return t.double() if op == "mean" and not t.is_floating_point() else t

    def clip_grad_norm_(self, parameters, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(list(parameters), max_norm, norm_type)

    def barrier(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def make_world(cfg: ParallelConfig | None = None, device: torch.device | str | None = None):
    """`DistributedWorld` under torchrun (WORLD_SIZE > 1) or inside an initialised process
    group, else `LocalWorld` (which refuses parallel degrees it cannot honour)."""
    cfg = cfg or ParallelConfig()
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 or (dist.is_available() and dist.is_initialized()
                          and dist.get_world_size() > 1):
        from .distributed import DistributedWorld

        return DistributedWorld(cfg, device)
    if not cfg.degrees_are_one():
        raise ValueError(f"parallel degrees dp_shard={cfg.dp_shard} dp_replicate="
                         f"{cfg.dp_replicate} ep={cfg.ep} etp={cfg.etp} cp={cfg.cp} need several "
                         f"processes; launch with torchrun --nproc_per_node N -m minimax01 train ...")
    return LocalWorld(device, cfg)


def __getattr__(name):
    if name == "DistributedWorld":  # lives in distributed.py (imports torch.distributed pieces)
        from .distributed import DistributedWorld

        return DistributedWorld
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
