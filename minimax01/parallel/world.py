"""The seam between the trainer and parallelism.

The trainer only talks to a `World`: where this process sits (data-parallel and context-parallel
rank), how to wrap the model, how to cut a batch, how to reduce a number, and how to save and
load a training checkpoint. `LocalWorld` is the single-process world; the distributed world
(FSDP2 x expert parallel x context parallel on one DeviceMesh) implements the same methods."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
