"""The layers of a MiniMax-01 decoder (SPEC §2-§5), single device.

Attention math is delegated to `minimax01.ops`; each attention module has an `attn_fn` slot that
parallel code (LASP+, ring attention) may fill from outside: it then computes every call, given
the forward's `AttnContext`. The MoE block runs the one MoE pipeline of `ops/moe.py` in the
configuration `moe.pipeline` names (training, expert parallel, serving). The model code never
imports `minimax01.parallel`."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import LINEAR, SLIDING, ModelConfig
from ..ops import lightning_attn
from ..ops.attention import cached_attention, causal_attention
from ..ops.lightning import lightning_slopes
from ..ops.moe import TRAINING, MoEPipeline, MoEStats, moe_pipeline, route
from ..ops.norm import rms_norm
from ..ops.rope import apply_rope


class AttnContext:
    """What every layer of one forward pass shares.

    Deliberately not a dataclass: FSDP2's mixed precision casts floating tensors inside dataclass
    arguments to the parameter dtype, and the RoPE tables must stay fp32 (SPEC §4) and identical
    when activation checkpointing recomputes a layer."""

    __slots__ = ("cu_seqlens", "cos", "sin", "valid", "cache", "position_ids", "plans")

    def __init__(self, cu_seqlens: torch.Tensor | None = None, cos: torch.Tensor | None = None,
                 sin: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                 cache: object | None = None, position_ids: torch.Tensor | None = None):
        self.cu_seqlens = cu_seqlens  # packed documents (B == 1)
        self.cos = cos                # RoPE tables [B, T, rotary_dim] or [T, rotary_dim], fp32
        self.sin = sin
        self.valid = valid            # [B, T] bool, False at padding; None: no padding
        self.cache = cache            # a cache with the HybridCache interface
        self.position_ids = position_ids  # as the caller gave them (None: the model derived them)
        self.plans: dict = {}         # what plug-ins compute once per forward and share across
                                      # layers (the context-parallel document structure)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class LightningAttention(nn.Module):
    """SiLU(qkv_proj(x)) split per head into q|k|v, causal linear attention with decay,
    RMSNorm over all heads, sigmoid output gate, out_proj (SPEC §3)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        width = config.attn_width
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * width, bias=False)
        self.output_gate = nn.Linear(config.hidden_size, width, bias=False)
        self.out_proj = nn.Linear(width, config.hidden_size, bias=False)
        self.norm = RMSNorm(width, config.lightning_norm_eps)
        self.layer_idx = layer_idx
        self.register_buffer("slope", lightning_slopes(self.num_heads, layer_idx,
                                                       config.num_hidden_layers), persistent=False)
        self.attn_fn = None  # sequence-parallel code (LASP+): attn_fn(q, k, v, slope, ctx) -> o

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        fused = getattr(ctx.cache, "lightning_layer", None) if self.attn_fn is None else None
        if fused is not None:  # a decode step running the whole layer fused (infer/fused_decode.py)
            out = fused(self, x, ctx)
            if out is not None:
                return out
        b, t, _ = x.shape
        qkv = F.silu(self.qkv_proj(x)).view(b, t, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        if ctx.valid is not None:
            v = v * ctx.valid[:, :, None, None].to(v.dtype)
        slope = self.slope.float()
        if self.attn_fn is not None:  # computes every call (and refuses what it cannot do)
            o = self.attn_fn(q, k, v, slope, ctx)
        elif ctx.cache is not None:
            o = ctx.cache.lightning(self.layer_idx, q, k, v, slope, ctx)
        else:
            o, _ = lightning_attn(q, k, v, slope, cu_seqlens=ctx.cu_seqlens)
        u = self.norm(o.reshape(b, t, -1))
        return self.out_proj(torch.sigmoid(self.output_gate(x)) * u)


class SoftmaxAttention(nn.Module):
    """GQA softmax attention with partial RoPE (SPEC §4). A `sliding_attention` layer (ours, not
    in the released model) is the same module with `window` set: each query sees only its own and
    the `window - 1` tokens before it."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.attn_width, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.kv_width, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.kv_width, bias=False)
        self.o_proj = nn.Linear(config.attn_width, config.hidden_size, bias=False)
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.layer_idx = layer_idx
        self.window = config.sliding_window if config.layer_types[layer_idx] == SLIDING else None
        self.attn_fn = None  # context-parallel code (ring): attn_fn(q, k, v, ctx, scale) -> o

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if self.attn_fn is not None:  # computes every call (and refuses what it cannot do)
            if self.window is not None:  # no plug-in knows windows: it would attend too far
                raise ValueError(f"sliding_attention layer {self.layer_idx}: context parallelism "
                                 f"(ring attention) does not support sliding windows")
            o = self.attn_fn(q, k, v, ctx, self.scale)
        elif ctx.cache is not None:
            if self.window is not None and not getattr(ctx.cache, "supports_sliding_window", False):
                raise ValueError(f"{type(ctx.cache).__name__} does not support sliding_attention "
                                 f"layers (layer {self.layer_idx}); use generate() / HybridCache")
            o = ctx.cache.attend(self.layer_idx, q, k, v, self.scale, ctx)
        elif ctx.valid is not None:
            o = cached_attention(q, k.transpose(1, 2), v.transpose(1, 2), ctx.valid,
                                 scale=self.scale, window=self.window)
        else:
            o = causal_attention(q, k, v, cu_seqlens=ctx.cu_seqlens, scale=self.scale,
                                 window=self.window)
        return self.o_proj(o.reshape(b, t, -1))


def _local(w: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this rank computes with (under expert or tensor parallelism the
    parameters are DTensors with global shapes; in one process, the tensor itself)."""
    return w.to_local() if hasattr(w, "to_local") else w


class Experts(nn.Module):
    """Expert weights stacked for grouped matmuls: gate_up_proj [E, 2I, H] (w1 rows then w3
    rows) and down_proj [E, H, I], the transformers >= 5 layout.

    The run stage of the MoE pipeline: one call per MoE forward computes every kept row (so FSDP
    unshards the weights once), through the pipeline's exchange. A module with the same call
    (e.g. quantised weights and a quantised grouped matmul) can take this one's place."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        with torch.no_grad():  # like nn.Linear, never garbage; the model's init_weights overrides
            self.gate_up_proj.normal_(0.0, h ** -0.5)
            self.down_proj.normal_(0.0, i ** -0.5)

    def forward(self, x: torch.Tensor, counts: torch.Tensor,
                pipeline: MoEPipeline = TRAINING) -> torch.Tensor:
        """x [M, H] rows grouped by (token group, expert); counts [G, E] (or [E]) rows per
        block. Returns [M, H] in x's row order."""
        counts = counts[None] if counts.dim() == 1 else counts
        compute = pipeline.compute(_local(self.gate_up_proj), _local(self.down_proj))
        return pipeline.exchange.run(compute, x, counts)


class MoE(nn.Module):
    """Top-k routed SwiGLU experts with renormalised weights, aux loss, optional token drop."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_experts, self.top_k = config.num_local_experts, config.num_experts_per_tok
        self.capacity_factor = config.capacity_factor
        self.gate = nn.Linear(config.hidden_size, self.num_experts, bias=False)
        self.experts = Experts(config)
        self.pipeline = TRAINING  # the MoE pipeline's configuration; parallel/ and infer/ set it
        self.last_stats: MoEStats | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (output like x, aux loss E * sum f_e P_e without the coefficient: this rank's
        share of its router group's, see ops/moe.py). Tokens are dropped over capacity in
        training mode only."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        routing = route(self.gate(flat), self.top_k)
        out, aux, self.last_stats = moe_pipeline(
            flat, routing, self.experts, self.pipeline, rows=shape[0] if x.dim() == 3 else 1,
            capacity_factor=self.capacity_factor if self.training else None)
        return out.reshape(shape), aux


class DecoderLayer(nn.Module):
    """Attention then MoE, each with the DeepNorm residual (SPEC §2)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        linear = self.layer_type == LINEAR
        self.self_attn = (LightningAttention if linear else SoftmaxAttention)(config, layer_idx)
        self.attn_alpha = config.linear_attn_alpha if linear else config.full_attn_alpha
        self.attn_beta = config.linear_attn_beta if linear else config.full_attn_beta
        self.mlp_alpha, self.mlp_beta = config.mlp_alpha, config.mlp_beta
        self.postnorm = config.postnorm
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config)

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> tuple[torch.Tensor, torch.Tensor]:
        fused = getattr(ctx.cache, "decoder_layer", None)
        if fused is not None:  # a decode step running the layer's norms fused (infer/fused_decode.py)
            out = fused(self, x, ctx)
            if out is not None:
                return out
        h1 = self.input_layernorm(x)
        residual = h1 if self.postnorm else x
        y = _scaled(self.attn_alpha, residual) + _scaled(self.attn_beta, self.self_attn(h1, ctx))
        h2 = self.post_attention_layernorm(y)
        residual = h2 if self.postnorm else y
        moe_out, aux = self.mlp(h2)
        return _scaled(self.mlp_alpha, residual) + _scaled(self.mlp_beta, moe_out), aux


def _scaled(a: float, x: torch.Tensor) -> torch.Tensor:
    """a * x, without the kernel (forward and backward) when a == 1 (pre-norm models: every
    residual scale is 1, and 1.0 * x is x exactly)."""
    return x if a == 1.0 else a * x
