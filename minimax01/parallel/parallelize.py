"""`parallelize(model, world, cfg)`: parallelism applied to a built model from outside, in one
readable order (torchtitan's shape). The model code is the same single-device code throughout;
what changes is the configuration of its seams.

  0. weights: on the world's device, rank 0's initial weights on every rank (FSDP then shards
     each rank's own copy);
  1. EP: every MoE block on the expert-parallel pipeline (global router; all-to-all when ep > 1;
     expert tensor parallel when etp > 1) and the expert weights split over the EP ranks (by
     expert) and the ETP ranks (by intermediate dim);
  2. CP (cp > 1): LASP+ in every lightning layer and ring attention in every softmax layer
     (`attn_fn`); they read the document structure from each forward's AttnContext;
  3. FSDP2 over the data dimensions (dense: dp_shard x cp, experts: the expert-data-parallel
     mesh), gradients divided as parallel/scaling.py says.

In one process (a world without a mesh) the model is returned as it is."""

from __future__ import annotations

import torch

from ..model.layers import LightningAttention, SoftmaxAttention
from .config import PARAM_DTYPES, ParallelConfig
from .context import CPGroup
from .expert_parallel import apply_expert_parallel
from .fsdp import apply_fsdp, broadcast_parameters, shard_experts
from .lasp import LaspAttention
from .mesh import resolve_layout
from .ring_attention import RingAttention


def parallelize(model: torch.nn.Module, world, cfg: ParallelConfig | None = None) -> torch.nn.Module:
    """Apply EP -> CP -> FSDP to `model` in place for `world` (see the module docstring);
    returns the same module."""
    if world.mesh is None:
        return model
    cfg = cfg or world.cfg
    layout, mesh = world.layout, world.mesh
    resolve_layout(cfg, world.world_size, model.config.num_local_experts,
                   model.config.intermediate_size)
    if not any(p.is_meta for p in model.parameters()):
        model.to(world.device)
        if cfg.sync_init:
            broadcast_parameters(model)
    apply_expert_parallel(model, world.router, world.ep, cfg.ep_token_groups, world.etp)
    if layout.ep > 1 or layout.etp > 1:
        shard_experts(model, mesh)
    if layout.cp > 1:
        apply_context_parallel(model, CPGroup(mesh.cp.get_group(), world.cp_rank, world.cp_size),
                               cfg)
    apply_fsdp(model, mesh, param_dtype=PARAM_DTYPES[cfg.param_dtype],
               reshard_after_forward=cfg.reshard_after_forward,
               gradient_divide_factor=world.loss_scale.gradient_divide_factor)
    return model


def apply_context_parallel(model: torch.nn.Module, cp: CPGroup, cfg: ParallelConfig) -> None:
    """LASP+ and ring (or all-gather) attention over the CP group in every attention layer.
    Sliding-window layers are refused up front: neither ring form masks by window."""
    for module in model.modules():
        if isinstance(module, SoftmaxAttention) and module.window is not None:
            raise ValueError(f"sliding_attention layer {module.layer_idx}: context parallelism "
                             f"(ring attention) does not support sliding windows; use cp=1")
    for module in model.modules():
        if isinstance(module, LightningAttention):
            module.attn_fn = LaspAttention(cp)
        elif isinstance(module, SoftmaxAttention):
            module.attn_fn = RingAttention(cp, cfg.cp_attention, cfg.cp_kernel, cfg.cp_balance)
