"""`DistributedWorld`: FSDP2 x expert parallel x context parallel on one DeviceMesh.

`parallelize(model)` applies, from outside the model code:
  1. rank 0's initial weights on every rank (FSDP shards each rank's own copy);
  2. MoE dispatchers (global router, token drop, all-to-all when ep > 1) and, with ep > 1,
     expert weights split over the EP mesh;
  3. with cp > 1, LASP+ in every lightning layer and ring attention in every softmax layer;
  4. FSDP2 over the data dimensions;
  5. a forward pre-hook on the model that records the batch rows and (under CP) gathers the
     document structure of the whole sequence once per forward.

Loss convention (what the trainer does): FSDP averages gradients over all W ranks, so each rank
backpropagates `W * (its lm-loss token sum) / (global target count) + aux_loss`; the MoE aux
loss returned by the dispatchers is already scaled that way (its mean over ranks is the loss).
Then gradients equal the single-process ones on the concatenated batch.

`shard_batch` cuts a data-parallel rank's batch into this CP rank's slice (batch.py)."""

from __future__ import annotations

import inspect
import os

import torch
import torch.distributed as dist

from ..model.layers import LightningAttention, SoftmaxAttention
from .batch import cp_slice
from .context import CPContext
from .expert_parallel import EPGroup, ExpertParallel, RouterGroup, install_experts_forward
from .fsdp import apply_fsdp, broadcast_parameters, shard_experts
from .lasp import LaspAttention
from .mesh import ParallelMesh, resolve_layout
from .ring_attention import RingAttention
from .world import ROUTER_SCOPES, ParallelConfig

_DTYPES = {"none": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16}
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN,
        "mean": dist.ReduceOp.SUM}


class ForwardState:
    """What the dispatchers and attention functions of one forward share."""

    rows: int | None = None
    cp: CPContext | None = None


class DistributedWorld:
    def __init__(self, cfg: ParallelConfig, device: torch.device | str | None = None):
        _check_options(cfg)
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
        self.state = ForwardState()

    def _router_group(self) -> RouterGroup:
        layout, mesh, scope = self.layout, self.mesh, self.cfg.router_scope
        if scope == "global":
            return RouterGroup(dist.group.WORLD, self.world_size, layout.cp, self.rank)
        if scope == "ep" and layout.ep > layout.cp:
            return RouterGroup(mesh.ep.get_group(), layout.ep, layout.cp, mesh.ep_rank)
        return RouterGroup(mesh.cp.get_group(), layout.cp, layout.cp, mesh.cp_rank)

    # ------------------------------------------------------------------ model
    def parallelize(self, model: torch.nn.Module) -> torch.nn.Module:
        cfg, layout, mesh = self.cfg, self.layout, self.mesh
        resolve_layout(cfg, self.world_size, model.config.num_local_experts)
        if not any(p.is_meta for p in model.parameters()):
            model.to(self.device)
            if cfg.sync_init:
                broadcast_parameters(model)
        ep = EPGroup(mesh.ep.get_group(), layout.ep, mesh.ep_rank)
        for layer in model.model.layers:
            install_experts_forward(layer.mlp.experts)
            layer.mlp.dispatcher = ExpertParallel(self.state, self.router, ep, cfg.ep_token_groups)
        if layout.ep > 1:
            shard_experts(model, mesh)
        if layout.cp > 1:
            for module in model.modules():
                if isinstance(module, LightningAttention):
                    module.attn_fn = LaspAttention(self.state)
                elif isinstance(module, SoftmaxAttention):
                    module.attn_fn = RingAttention(self.state, cfg.cp_attention, cfg.cp_kernel,
                                                   cfg.cp_balance)
        apply_fsdp(model, mesh, param_dtype=_DTYPES[cfg.param_dtype],
                   reshard_after_forward=cfg.reshard_after_forward)
        signature = inspect.signature(type(model).forward)
        model.register_forward_pre_hook(self._make_pre_hook(signature), with_kwargs=True)
        return model

    def _make_pre_hook(self, signature):
        def hook(module, args, kwargs):
            call = signature.bind(module, *args, **kwargs).arguments
            ids = call["input_ids"]
            self.state.rows = ids.shape[0] if ids.dim() == 2 else 1
            self.state.cp = None
            if self.cp_size > 1:
                if call.get("cache") is not None:
                    raise ValueError("cached generation is not supported under context parallelism")
                if call.get("position_ids") is None:
                    raise ValueError("under context parallelism the model needs the global "
                                     "position_ids of its slice: pass the batch through "
                                     "world.shard_batch and give all its keys to the model")
                mask = call.get("attention_mask")
                if mask is not None and not bool(mask.bool().all()):
                    raise ValueError("padding is not supported under context parallelism")
                self.state.cp = CPContext.gather(self.mesh.cp.get_group(), self.cp_rank,
                                                 self.cp_size, call["position_ids"])
            return None
        return hook

    # ------------------------------------------------------------------ data
    def shard_batch(self, batch: dict) -> dict:
        """This CP rank's slice of a data-parallel rank's batch (identity without CP)."""
        if self.cp_size == 1:
            return batch
        return cp_slice(batch, self.cp_rank, self.cp_size)

    # ------------------------------------------------------------------ gradients
    def clip_grad_norm_(self, parameters, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Global gradient norm over every rank's shards, then clip in place. Parameters live
        on different meshes (dense FSDP mesh, expert EDP x EP mesh), which one
        `torch.nn.utils.clip_grad_norm_` cannot combine: each group's norm is reduced over its
        own mesh, then the groups are combined."""
        from torch.distributed.tensor import DTensor

        params = [p for p in parameters if p.grad is not None]
        groups: dict = {}
        for p in params:
            g = p.grad
            key = (id(g.device_mesh), g.placements) if isinstance(g, DTensor) else None
            groups.setdefault(key, []).append(p)
        norms = []
        for group in groups.values():
            n = torch.nn.utils.get_total_norm([p.grad for p in group], norm_type)
            norms.append((n.full_tensor() if isinstance(n, DTensor) else n).float())
        if not norms:
            return torch.zeros((), device=self.device)
        total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
        for group in groups.values():  # one mesh at a time
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
        return total

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, value: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce over every rank; op "sum", "mean", "max" or "min". Returns a new tensor on
        the input's device."""
        if op not in _OPS:
            raise ValueError(f"unknown reduce op {op!r}; use one of {', '.join(_OPS)}")
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


def _check_options(cfg: ParallelConfig) -> None:
    if cfg.router_scope not in ROUTER_SCOPES:
        raise ValueError(f"parallel.router_scope must be one of {', '.join(ROUTER_SCOPES)}, "
                         f"got {cfg.router_scope!r}")
    if cfg.param_dtype not in _DTYPES:
        raise ValueError(f"parallel.param_dtype must be one of {', '.join(_DTYPES)}, "
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
