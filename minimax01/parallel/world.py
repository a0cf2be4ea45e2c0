"""The seam between the trainer and parallelism.

The trainer only talks to a `World`: where this process sits (data-parallel and context-parallel
rank), how to wrap the model, how to cut a batch, how to reduce a number. `LocalWorld` is the
single-process world; `DistributedWorld` (FSDP2 x expert parallel x context parallel on one
DeviceMesh) implements the same methods; `make_world` picks one from the environment
(torchrun sets WORLD_SIZE)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

ROUTER_SCOPES = ("global", "ep", "local")


@dataclass
class ParallelConfig:
    """Parallel degrees. Their product with `dp_replicate` must equal the world size;
    `dp_shard = -1` takes whatever is left. The global batch and the math do not depend on the
    layout."""

    dp_shard: int = -1       # FSDP2 sharding degree of the dense parameters
    dp_replicate: int = 1    # plain replication on top of sharding (HSDP)
    ep: int = 1              # expert parallel degree (experts split over `ep` ranks)
    cp: int = 1              # context (sequence) parallel degree: LASP+ and ring attention
    ep_token_groups: int = 1  # split tokens into groups to overlap all-to-all with expert compute
    backend: str = "auto"    # "nccl" on CUDA, "gloo" on CPU
    # Ranks whose tokens share MoE capacity, router statistics and the loss mean: "global" (all
    # ranks: a distributed micro-step computes what one process computes on the concatenated
    # micro-batches), "ep" (the expert-parallel group, as in the paper), "local" (each
    # data-parallel rank's rows alone, like gradient-accumulation steps).
    router_scope: str = "global"
    cp_attention: str = "ring"   # softmax layers under CP: "ring" or "allgather" (reference)
    cp_balance: bool = True      # zigzag layout for ring attention (equal causal work per rank)
    cp_kernel: str = "auto"      # per-block attention: auto (flash on CUDA) | math | flash
    param_dtype: str = "none"    # FSDP2 compute dtype of the parameters ("none": keep)
    reshard_after_forward: bool = True  # free gathered parameters after each layer's forward
    sync_init: bool = True       # broadcast rank 0's initial weights before sharding

    def degrees_are_one(self) -> bool:
        return (self.dp_shard in (-1, 1) and self.dp_replicate == 1 and self.ep == 1
                and self.cp == 1)


class LocalWorld:
    """One process, one device: every hook is the identity."""

    rank = 0
    world_size = 1
    dp_rank, dp_size = 0, 1
    cp_rank, cp_size = 0, 1
    is_main = True

    def __init__(self, device: torch.device | str | None = None):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)

    def parallelize(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def shard_batch(self, batch: dict) -> dict:
        """Cut a data-parallel rank's batch for context parallelism (identity here)."""
        return batch

    def all_reduce(self, value: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return value

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
                         f"{cfg.dp_replicate} ep={cfg.ep} cp={cfg.cp} need several processes; "
                         f"launch with torchrun --nproc_per_node N -m minimax01 train ...")
    return LocalWorld(device)


def __getattr__(name):
    if name == "DistributedWorld":  # lives in distributed.py (imports torch.distributed pieces)
        from .distributed import DistributedWorld

        return DistributedWorld
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
