"""`DistributedWorld`: a process group and one DeviceMesh for FSDP2 x expert parallel x context
parallel, behind the `World` interface (world.py).

It holds where this rank sits (ranks, the mesh and its sub-meshes, the MoE router group, the EP
group), cuts batches (`shard_batch`: this CP rank's slice, batch.py), reduces numbers and
gradient norms over ranks, and its `loss_scale` (parallel/scaling.py). It does not change the
model: `parallelize(model, world, cfg)` (parallelize.py) does, and `world.parallelize(model)` is
that call."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..ops.moe import RouterGroup
from .batch import cp_slice
from .config import ParallelConfig, check_options, check_reduce_op
from .expert_parallel import EPGroup, ETPGroup, router_group
from .mesh import ParallelMesh, resolve_layout
from .scaling import LossScale

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN,
        "mean": dist.ReduceOp.SUM}


class DistributedWorld:
    def __init__(self, cfg: ParallelConfig, device: torch.device | str | None = None):
        check_options(cfg)
        self.cfg = cfg
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device is None:
            device = "cuda" if torch.cuda.is_available() and cfg.backend != "gloo" else "cpu"
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)  # one GPU per process
        self.device = device
        backend = cfg.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            dist.init_process_group(backend, device_id=self.device if backend == "nccl" else None)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.layout = resolve_layout(cfg, self.world_size)
        self.mesh = ParallelMesh(self.layout, self.device.type)
        self.dp_rank, self.dp_size = self.mesh.dp_rank, self.layout.dp
        self.cp_rank, self.cp_size = self.mesh.cp_rank, self.layout.cp
        self.router = self._router_group()
        self.ep = EPGroup(self.mesh.ep.get_group(), self.layout.ep, self.mesh.ep_rank)
        self.etp = ETPGroup(self.mesh.etp.get_group(), self.layout.etp, self.mesh.etp_rank)
        self.loss_scale = LossScale(self.world_size, self.router.size)

    def _router_group(self) -> RouterGroup:
        """The ranks whose tokens share MoE capacity and statistics (`router_scope`)."""
        layout, mesh, scope = self.layout, self.mesh, self.cfg.router_scope
        if scope == "global":
            return router_group(dist.group.WORLD, self.world_size, layout.cp, self.rank)
        if scope == "ep" and layout.ep > layout.cp:
            return router_group(mesh.ep.get_group(), layout.ep, layout.cp, mesh.ep_rank)
        return router_group(mesh.cp.get_group(), layout.cp, layout.cp, mesh.cp_rank)

    # ------------------------------------------------------------------ model
    def parallelize(self, model: torch.nn.Module) -> torch.nn.Module:
        """`parallelize(model, self, self.cfg)` (parallelize.py)."""
        from .parallelize import parallelize

        return parallelize(model, self, self.cfg)

    # ------------------------------------------------------------------ data
    def shard_batch(self, batch: dict) -> dict:
        """This CP rank's slice of a data-parallel rank's batch (identity without CP)."""
        if self.cp_size == 1:
            return batch
        return cp_slice(batch, self.cp_rank, self.cp_size)

    # ------------------------------------------------------------------ gradients
    def clip_grad_norm_(self, parameters, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Global gradient norm over every rank's shards, then clip in place. Every gradient
        is a DTensor whose mesh spans the world (dense: FSDP mesh; experts: EDP x ETP x EP)
        or a plain tensor replicated on every rank, so the norm is one all-reduce of the local
        shards' fused norms (`torch._foreach_norm`), each divided by how many ranks hold the
        same values (its Replicate dims; every rank for a plain tensor). DTensor's own norm
        would redistribute over meshes that mix flattened dims (ETP's cannot be flattened)."""
        import math

        from torch.distributed.tensor import DTensor

        params = [p for p in parameters if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.device)
        local, copies = [], []
        for p in params:
            g = p.grad
            if isinstance(g, DTensor):
                local.append(g.to_local())
                copies.append(math.prod(g.device_mesh.size(i) for i, pl in
                                        enumerate(g.placements) if pl.is_replicate()))
            else:
                local.append(g)
                copies.append(self.world_size)
        norms = torch.stack(torch._foreach_norm(local, norm_type)).float()
        if math.isinf(norm_type):
            total = norms.max()
            dist.all_reduce(total, op=dist.ReduceOp.MAX)
        else:
            weights = torch.tensor(copies, dtype=torch.float32, device=norms.device)
            total = (norms.pow(norm_type) / weights).sum()
            dist.all_reduce(total)
            total = total.pow(1.0 / norm_type)
        groups: dict = {}
        for p in params:  # clip one mesh at a time
            g = p.grad
            key = (id(g.device_mesh), g.placements) if isinstance(g, DTensor) else None
            groups.setdefault(key, []).append(p)
        for group in groups.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
        return total

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, value: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce over every rank; op "sum", "mean", "max" or "min". Returns a new tensor on
        the input's device."""
        check_reduce_op(op)
        t = torch.as_tensor(value).detach().clone().to(self.device)
        if not t.is_floating_point() and op == "mean":
            t = t.double()
        dist.all_reduce(t, op=_OPS[op])
        if op == "mean":
            t = t / self.world_size
        return t.to(value.device if isinstance(value, torch.Tensor) else "cpu")

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

