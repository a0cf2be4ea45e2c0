"""Fused decode steps (issue 18 item 4): the glue between a model's layers and ops/decode's
fused kernels, and the rule for when the engine may use them.

A cache record that has a `lightning_layer(attn, x, ctx)` method gets the whole lightning layer,
one with `decoder_layer(layer, x, ctx)` the whole decoder layer (model/layers.py asks them
first; returning None declines, and the layer runs unfused). `FusedDecodeStep` is the slot
cache's decode record with both: the linears stay the modules' own (so quantised weights
work); the lightning layer's elementwise tail is two launches, each RMSNorm with the residual
before it one, and the MoE of up to MOE_MAX_TOKENS tokens two after the router matmul."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from ..config import LINEAR, ModelConfig
from ..model.layers import Experts
from ..ops.decode import MOE_MAX_TOKENS, lightning_decode_gated, moe_decode, residual_rms_norm
from ..parallel.config import ParallelConfig
from ..parallel.tensor_parallel import TPInfo
from ..parallel.tp_modules import TPGroup
from .slot_cache import DecodeStep

__all__ = ["FusedDecodeStep", "fused", "fused_decode_supported", "fused_decoder_layer",
           "fused_lightning_forward", "fused_moe_forward"]


def _degrees(parallel) -> tuple[int, int]:
    """(tensor-parallel, expert-parallel) degree of `parallel`."""
    if parallel is None:
        return 1, 1
    if isinstance(parallel, bool) or not isinstance(parallel, (int, TPGroup, TPInfo,
                                                               ParallelConfig)):
        raise TypeError(f"parallel must be None, a tensor-parallel degree, a TPGroup, TPInfo or "
                        f"ParallelConfig; got {type(parallel).__name__}")
    if isinstance(parallel, int):
        return parallel, 1
    if isinstance(parallel, TPGroup):
        return parallel.size, 1
    if isinstance(parallel, TPInfo):
        return parallel.tp.size, parallel.tp.size if parallel.expert_parallel else 1
    return 1, parallel.ep


def fused_decode_supported(model_cfg: ModelConfig, parallel=None) -> bool:
    """True when decode steps of this model may run its lightning layers fused: the model has
    lightning layers and runs in one process (under tensor parallelism a rank holds a slice of
    the heads and the RMSNorm spans ranks, parallel/tp_norm.py; under expert parallelism the
    step is collective-bound and the tp engine owns it)."""
    tp, ep = _degrees(parallel)
    return tp == 1 and ep == 1 and LINEAR in model_cfg.layer_types


def fused_lightning_forward(attn, x: torch.Tensor, state: torch.Tensor,
                            slot_idx: torch.Tensor | None = None,
                            valid: torch.Tensor | None = None, backend: str | None = None):
    """One decode token through LightningAttention `attn`: x [B, 1, hidden] -> [B, 1, hidden];
    `state` [N, H, D, D] fp32 rows `slot_idx` updated in place; valid [B, 1] or [B] bool."""
    b = x.shape[0]
    if x.dim() != 3 or x.shape[1] != 1:
        raise ValueError(f"fused decode takes one token per row, x [B, 1, H]; got {list(x.shape)}")
    x2 = x.reshape(b, -1)
    u = lightning_decode_gated(attn.qkv_proj(x2), attn.output_gate(x2), state, attn.slope.float(),
                               attn.norm.weight, attn.norm.eps, slot_idx=slot_idx,
                               valid=None if valid is None else valid.reshape(b),
                               backend=backend)
    return attn.out_proj(u)[:, None]


def fused_decoder_layer(layer, x: torch.Tensor, ctx, backend: str | None = None):
    """DecoderLayer `layer` on one decode token per row, x [B, 1, hidden]: the layer's code
    (model/layers.py) with each residual + RMSNorm pair one launch. Returns (out, aux)."""
    b = x.shape[0]
    flat = x.reshape(b, -1)
    norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
    _, h1 = residual_rms_norm(flat, norm1.weight, norm1.eps, backend=backend)
    residual = h1 if layer.postnorm else flat
    attn = layer.self_attn(h1.view(b, 1, -1), ctx).reshape(b, -1)
    y, h2 = residual_rms_norm(attn, norm2.weight, norm2.eps, residual, layer.attn_alpha,
                              layer.attn_beta, backend=backend)
    residual = h2 if layer.postnorm else y
    moe_out, aux = fused_moe_forward(layer.mlp, h2, backend)
    scaled = residual if layer.mlp_alpha == 1 else layer.mlp_alpha * residual
    return torch.add(scaled, moe_out.reshape(b, -1), alpha=layer.mlp_beta).view(b, 1, -1), aux


def fused_moe_forward(mlp, h: torch.Tensor, backend: str | None = None):
    """MoE block `mlp` on h [N, hidden]: the two-launch small-batch MoE (ops/decode) for up to
    MOE_MAX_TOKENS tokens of plain local experts, else the block itself (quantised or sharded
    experts, a tensor-parallel reduce, larger batches). Returns (out [N, hidden], aux)."""
    ex = mlp.experts
    if (h.shape[0] <= MOE_MAX_TOKENS and type(ex) is Experts and mlp.pipeline.reduce is None
            and type(ex.gate_up_proj.data) is torch.Tensor):
        out = moe_decode(h, mlp.gate(h), ex.gate_up_proj, ex.down_proj, mlp.top_k,
                         backend=backend)
        return out, h.new_zeros((), dtype=torch.float32)
    out, aux = mlp(h[:, None])
    return out.reshape(h.shape), aux


@dataclass
class FusedDecodeStep(DecodeStep):
    """The slot cache's decode record, lightning layers fused."""

    def _backend(self) -> str:
        return "triton" if self.cache.decode_backend == "triton" else "torch"

    def lightning_layer(self, attn, x, ctx):
        return fused_lightning_forward(attn, x, self.cache.pool.states[attn.layer_idx],
                                       self.slot_idx, ctx.valid, backend=self._backend())

    def decoder_layer(self, layer, x, ctx):
        return fused_decoder_layer(layer, x, ctx, backend=self._backend())


def fused(step: DecodeStep) -> FusedDecodeStep:
    """The same decode record (same tensors, no copies), its lightning layers fused."""
    return FusedDecodeStep(**{f.name: getattr(step, f.name) for f in fields(step)})
