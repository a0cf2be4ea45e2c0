"""`ParallelConfig`: the parallel degrees and options of a run, their validation, and the names
of the options every world accepts (reduce ops).

Plain data (no torch.distributed), so the run config, `LocalWorld` and `DistributedWorld` can all
import it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROUTER_SCOPES = ("global", "ep", "local")
PARAM_DTYPES = {"none": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16}
REDUCE_OPS = ("sum", "mean", "max", "min")


@dataclass
class ParallelConfig:
    """Parallel degrees. Their product with `dp_replicate` must equal the world size;
    `dp_shard = -1` takes whatever is left. The global batch and the math do not depend on the
    layout."""

    dp_shard: int = -1       # FSDP2 sharding degree of the dense parameters
    dp_replicate: int = 1    # plain replication on top of sharding (HSDP)
    ep: int = 1              # expert parallel degree (experts split over `ep` ranks)
    cp: int = 1              # context (sequence) parallel degree: LASP+ and ring attention
    etp: int = 1             # expert tensor parallel degree: each expert's intermediate dim split
                             # over `etp` ranks (paper §3.1); experts live on ep x etp ranks
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
                and self.cp == 1 and self.etp == 1)


def check_options(cfg: ParallelConfig) -> None:
    """One-line errors naming the bad option (the degrees are checked by mesh.resolve_layout)."""
    if cfg.router_scope not in ROUTER_SCOPES:
        raise ValueError(f"parallel.router_scope must be one of {', '.join(ROUTER_SCOPES)}, "
                         f"got {cfg.router_scope!r}")
    if cfg.param_dtype not in PARAM_DTYPES:
        raise ValueError(f"parallel.param_dtype must be one of {', '.join(PARAM_DTYPES)}, "
                         f"got {cfg.param_dtype!r}")
    if cfg.backend not in ("auto", "nccl", "gloo"):
        raise ValueError(f"parallel.backend must be auto, nccl or gloo, got {cfg.backend!r}")
    if cfg.cp_attention not in ("ring", "allgather"):
        raise ValueError(f"parallel.cp_attention must be ring or allgather, got {cfg.cp_attention!r}")
    if cfg.cp_kernel not in ("auto", "math", "flash", "cpu_flash"):
        raise ValueError(f"parallel.cp_kernel must be auto, math or flash, got {cfg.cp_kernel!r}")
    if not isinstance(cfg.ep_token_groups, int) or cfg.ep_token_groups < 1:
        raise ValueError(f"parallel.ep_token_groups must be a positive integer, "
                         f"got {cfg.ep_token_groups!r}")


def check_reduce_op(op: str) -> None:
    if op not in REDUCE_OPS:
        raise ValueError(f"unknown reduce op {op!r}; use one of {', '.join(REDUCE_OPS)}")
