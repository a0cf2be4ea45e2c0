"""The layers of a MiniMax-01 decoder (SPEC §2-§5), single device.

Attention math is delegated to `minimax01.ops`; each attention module has an `attn_fn` slot that
parallel code (LASP+, ring attention) may fill from outside, and the MoE block has a `dispatcher`
slot for expert parallelism. The model code never imports `minimax01.parallel`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import LINEAR, SLIDING, ModelConfig
from ..ops import lightning_attn
from ..ops.attention import cached_attention, causal_attention
from ..ops.lightning import lightning_slopes
from ..ops.moe import (combine, dispatch, expert_capacity, expert_counts, load_balancing_loss,
                       route, swiglu_experts)
from ..ops.norm import rms_norm
from ..ops.rope import apply_rope


class AttnContext:
    """What every layer of one forward pass shares.

    Deliberately not a dataclass: FSDP2's mixed precision casts floating tensors inside dataclass
    arguments to the parameter dtype, and the RoPE tables must stay fp32 (SPEC §4) and identical
    when activation checkpointing recomputes a layer."""

    __slots__ = ("cu_seqlens", "cos", "sin", "valid", "cache")

    def __init__(self, cu_seqlens: torch.Tensor | None = None, cos: torch.Tensor | None = None,
                 sin: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                 cache: object | None = None):
        self.cu_seqlens = cu_seqlens  # packed documents (B == 1)
        self.cos = cos                # RoPE tables [B, T, rotary_dim] or [T, rotary_dim], fp32
        self.sin = sin
        self.valid = valid            # [B, T] bool, False at padding; None: no padding
        self.cache = cache            # a cache with the HybridCache interface


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
        self.attn_fn = None  # replaced by sequence-parallel code (LASP+)

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = F.silu(self.qkv_proj(x)).view(b, t, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        if ctx.valid is not None:
            v = v * ctx.valid[:, :, None, None].to(v.dtype)
        slope = self.slope.float()
        if ctx.cache is not None:
            o = ctx.cache.lightning(self.layer_idx, q, k, v, slope, ctx)
        else:
            fn = self.attn_fn or lightning_attn
            o, _ = fn(q, k, v, slope, cu_seqlens=ctx.cu_seqlens)
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
        self.attn_fn = None  # replaced by context-parallel code (ring attention)

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if ctx.cache is not None:
            if self.window is not None and not getattr(ctx.cache, "supports_sliding_window", False):
                raise ValueError(f"{type(ctx.cache).__name__} does not support sliding_attention "
                                 f"layers (layer {self.layer_idx}); use generate() / HybridCache")
            o = ctx.cache.attend(self.layer_idx, q, k, v, self.scale, ctx)
        elif ctx.valid is not None:
            o = cached_attention(q, k.transpose(1, 2), v.transpose(1, 2), ctx.valid,
                                 scale=self.scale, window=self.window)
        elif self.window is not None:
            if self.attn_fn is not None:
                raise ValueError(f"sliding_attention layer {self.layer_idx}: context parallelism "
                                 f"(ring attention) does not support sliding windows")
            o = causal_attention(q, k, v, cu_seqlens=ctx.cu_seqlens, scale=self.scale,
                                 window=self.window)
        else:
            fn = self.attn_fn or causal_attention
            o = fn(q, k, v, cu_seqlens=ctx.cu_seqlens, scale=self.scale)
        return self.o_proj(o.reshape(b, t, -1))


@dataclass
class MoEStats:
    """Detached per-layer routing statistics of the last forward (for training logs)."""

    load: torch.Tensor  # [E] fraction of assignments per expert (sums to 1)
    dropped: int        # assignments dropped by the capacity limit
    assignments: int    # tokens * top_k


class Experts(nn.Module):
    """Expert weights stacked for grouped matmuls: gate_up_proj [E, 2I, H] (w1 rows then w3
    rows) and down_proj [E, H, I], the transformers >= 5 layout."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        with torch.no_grad():  # like nn.Linear, never garbage; the model's init_weights overrides
            self.gate_up_proj.normal_(0.0, h ** -0.5)
            self.down_proj.normal_(0.0, i ** -0.5)

    def forward(self, x_grouped: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return swiglu_experts(x_grouped, counts, self.gate_up_proj, self.down_proj)


class MoE(nn.Module):
    """Top-k routed SwiGLU experts with renormalised weights, aux loss, optional token drop."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_experts, self.top_k = config.num_local_experts, config.num_experts_per_tok
        self.capacity_factor = config.capacity_factor
        self.gate = nn.Linear(config.hidden_size, self.num_experts, bias=False)
        self.experts = Experts(config)
        self.dispatcher = None  # replaced by expert-parallel code
        self.last_stats: MoEStats | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (output like x, aux loss E * sum f_e P_e without the coefficient)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        routing = route(self.gate(flat), self.top_k)
        if self.dispatcher is not None:
            out, aux, stats = self.dispatcher(self, flat, routing)
        else:
            out, aux, stats = self.local_forward(flat, routing)
        self.last_stats = stats
        return out.reshape(shape), aux

    def local_forward(self, flat: torch.Tensor, routing):
        n = flat.shape[0]
        counts = expert_counts(routing.experts, self.num_experts)
        capacity = None
        if self.capacity_factor is not None and self.training:
            capacity = expert_capacity(n, self.top_k, self.num_experts, self.capacity_factor)
        plan = dispatch(routing.experts, self.num_experts, capacity)
        x_grouped = flat[plan.order // self.top_k]
        y = self.experts(x_grouped, plan.counts)
        out = combine(y, plan.order, routing.weights, n)
        aux = load_balancing_loss(routing.probs, counts, n)
        stats = MoEStats(load=(counts.float() / (n * self.top_k)).detach(),
                         dropped=plan.dropped, assignments=n * self.top_k)
        return out.to(flat.dtype), aux, stats


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
        h1 = self.input_layernorm(x)
        residual = h1 if self.postnorm else x
        y = self.attn_alpha * residual + self.attn_beta * self.self_attn(h1, ctx)
        h2 = self.post_attention_layernorm(y)
        residual = h2 if self.postnorm else y
        moe_out, aux = self.mlp(h2)
        return self.mlp_alpha * residual + self.mlp_beta * moe_out, aux
