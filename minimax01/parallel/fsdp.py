"""FSDP2 (`fully_shard`) for the dense part and expert-parallel sharding of the experts.

Expert weights first become DTensors split over the EP mesh along the expert dim (each EP rank
keeps its E/ep experts) and, with expert tensor parallelism, over the ETP mesh along the
intermediate dim (`etp_placements`); FSDP2 then shards every group of parameters over its data mesh: the
experts over the expert-data-parallel mesh, everything else over dp_shard x cp. Parameters stay
DTensors with global shapes, which is what lets torch.distributed.checkpoint reshard a
checkpoint onto any other layout.

Gradients: every group divides its reduced gradient by the same factor, the world size, the
experts included (their EDP mesh is smaller than the world); why: parallel/scaling.py."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from .mesh import ParallelMesh


def broadcast_parameters(model: nn.Module, src: int = 0) -> None:
    """Make every rank start from rank `src`'s weights (FSDP takes each rank's own copy)."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if not t.is_meta:
                dist.broadcast(t.data, src=src)


# ETP placement of each expert weight: gate_up_proj [E, 2I, H] is [w1; w3] along dim 1, so
# slice j is rows j of *each* half (a strided shard: two boxes of the global tensor);
# down_proj [E, H, I] is split by columns.
ETP_PLACEMENTS = {"gate_up_proj": _StridedShard(1, split_factor=2), "down_proj": Shard(2)}


def etp_slice(full: torch.Tensor, name: str, rank: int, size: int) -> torch.Tensor:
    """ETP rank `rank`'s slice of an expert weight (see ETP_PLACEMENTS)."""
    if name == "down_proj":
        return full.chunk(size, dim=2)[rank]
    w1, w3 = full.chunk(2, dim=1)
    return torch.cat([w1.chunk(size, dim=1)[rank], w3.chunk(size, dim=1)[rank]], dim=1)


def shard_experts(model: nn.Module, mesh: ParallelMesh) -> None:
    """Keep this rank's experts (and, with ETP, its slice of them), as DTensors: Shard(0) over
    the EP mesh, and ETP_PLACEMENTS over the ETP mesh."""
    ep, rank, etp = mesh.layout.ep, mesh.ep_rank, mesh.layout.etp
    for layer in model.model.layers:
        experts = layer.mlp.experts
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name)
            per = full.shape[0] // ep
            local = full.detach()[rank * per:(rank + 1) * per]
            placements = [Shard(0)]
            if etp > 1:
                local = etp_slice(local, name, mesh.etp_rank, etp)
                placements = [ETP_PLACEMENTS[name], Shard(0)]  # mesh (etp, ep)
            dt = DTensor.from_local(local.clone(), mesh.expert_shards, placements,
                                    run_check=False, shape=full.shape, stride=full.stride())
            setattr(experts, name, nn.Parameter(dt, requires_grad=full.requires_grad))


def _divide_by(module, factor: float, reduce_size: int) -> None:
    if hasattr(module, "set_gradient_divide_factor"):
        module.set_gradient_divide_factor(factor)
    else:  # torch < 2.7
        module.set_reduce_scatter_divide_factor(factor)
    if (dist.get_backend() == "gloo" and reduce_size > 1
            and hasattr(module, "set_force_sum_reduction_for_comms")):
        module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM


def apply_fsdp(model: nn.Module, mesh: ParallelMesh, *, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = torch.float32,
               reshard_after_forward: bool = True,
               gradient_divide_factor: float | None = None) -> nn.Module:
    """fully_shard bottom-up: experts (EP only), each decoder layer, embeddings, root. The
    expert groups divide their gradients by `gradient_divide_factor` (default: the world size,
    which is also what the dense groups divide by)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    dense = dict(mesh=mesh.dense, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    layout = mesh.layout
    for layer in model.model.layers:
        if layout.ep > 1 or layout.etp > 1:
            experts = layer.mlp.experts
            per = experts.gate_up_proj.shape[0] // layout.ep
            placement = (lambda p: Shard(1)) if layout.edp > per else None
            if layout.etp > 1:  # the hidden dim: ETP already splits the intermediate one
                hidden = {id(experts.gate_up_proj): Shard(2), id(experts.down_proj): Shard(1)}
                placement = lambda p, hidden=hidden: hidden[id(p)]  # noqa: E731
            fully_shard(experts, mesh=mesh.experts, mp_policy=mp,
                        reshard_after_forward=reshard_after_forward, shard_placement_fn=placement)
            _divide_by(experts, gradient_divide_factor or float(layout.world),
                       mesh.experts.size())
        fully_shard(layer, **dense)
    if not model.config.tie_word_embeddings:
        fully_shard(model.model.embed_tokens, **dense)
    # the final norm and lm_head stay in the root group: the chunked loss reads
    # lm_head.weight without calling the module
    fully_shard(model, mesh=mesh.dense, mp_policy=mp, reshard_after_forward=False)
    return model
