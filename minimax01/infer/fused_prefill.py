"""Fused norms in the serving prefill (issue 18: the fixed cost of a step that carries a prefill
chunk): the glue between a model's layers and ops/fused_norm, plugged in through the cache
record like infer/fused_decode.py (model/layers.py asks the record for `decoder_layer` and
`lightning_layer` first).

Per decoder layer, each RMSNorm (with the DeepNorm residual before the second) is one launch
instead of ~8-11, and the lightning layer's RMSNorm + sigmoid gate one instead of ~10; the
linears, the lightning op, the attention and the MoE are the modules' own, so quantised weights
work. The kernels round where the model's code rounds (ops/fused_norm), so the prefill's output
is the model's up to the order of a sum of squares. Single process only (under tensor
parallelism a rank holds a slice of the lightning norm's heads, parallel/tp_norm.py)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from ..ops.fused_norm import gated_rms_norm, residual_rms_norm
from .slot_cache import PrefillStep

__all__ = ["FusedPrefillStep", "fused_prefill", "fused_prefill_layer",
           "fused_lightning_prefill"]


def fused_lightning_prefill(attn, x: torch.Tensor, ctx, backend: str | None = None):
    """LightningAttention `attn` (model/layers.py) on x [B, T, hidden] with its RMSNorm and
    output gate in one launch; the state update is the cache's (`ctx.cache.lightning`)."""
    b, t, _ = x.shape
    qkv = F.silu(attn.qkv_proj(x)).view(b, t, attn.num_heads, 3 * attn.head_dim)
    q, k, v = qkv.split(attn.head_dim, dim=-1)
    if ctx.valid is not None:
        v = v * ctx.valid[:, :, None, None].to(v.dtype)
    o = ctx.cache.lightning(attn.layer_idx, q, k, v, attn.slope.float(), ctx)
    u = gated_rms_norm(o.reshape(b * t, -1), attn.output_gate(x).reshape(b * t, -1),
                       attn.norm.weight, attn.norm.eps, backend=backend)
    return attn.out_proj(u.view(b, t, -1))


def fused_prefill_layer(layer, x: torch.Tensor, ctx, backend: str | None = None):
    """DecoderLayer `layer` on x [B, T, hidden]: the layer's code with each RMSNorm (and the
    residual before the second) one launch. Returns (out, aux)."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
    _, h1 = residual_rms_norm(flat, norm1.weight, norm1.eps, backend=backend)
    residual = h1 if layer.postnorm else flat
    attn = layer.self_attn(h1.view(shape), ctx).reshape(flat.shape)
    y, h2 = residual_rms_norm(attn, norm2.weight, norm2.eps, residual, layer.attn_alpha,
                              layer.attn_beta, backend=backend)
    residual = (h2 if layer.postnorm else y).view(shape)
    moe_out, aux = layer.mlp(h2.view(shape))
    return layer.mlp_alpha * residual + layer.mlp_beta * moe_out, aux


@dataclass
class FusedPrefillStep(PrefillStep):
    """The slot cache's prefill record, its norms fused."""

    def _backend(self) -> str:
        return "triton" if self.cache.lightning_backend == "triton" else "torch"

    def lightning_layer(self, attn, x, ctx):
        return fused_lightning_prefill(attn, x, ctx, backend=self._backend())

    def decoder_layer(self, layer, x, ctx):
        return fused_prefill_layer(layer, x, ctx, backend=self._backend())


def fused_prefill(step: PrefillStep) -> FusedPrefillStep:
    """The same prefill record (same tensors, no copies), its norms fused."""
    return FusedPrefillStep(**{f.name: getattr(step, f.name) for f in fields(step)})
