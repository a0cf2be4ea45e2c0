"""DeepNet initialisation for training from scratch (SPEC §2, arXiv 2203.00555): Xavier-normal
everywhere; value, output, output-gate and expert matrices get gain (8N)^(-1/4); query/key gain 1.
The residual alpha lives in the config; its beta fields stay 1.0."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..config import deepnorm_beta_init
from .layers import Experts, LightningAttention, MoE, RMSNorm, SoftmaxAttention


@torch.no_grad()
def _xavier(w: torch.Tensor, gain: float) -> None:
    """Xavier-normal for a [fan_out, fan_in] matrix (a view is fine)."""
    fan_out, fan_in = w.shape[-2], w.shape[-1]
    w.normal_(0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)))


@torch.no_grad()
def init_weights(model: nn.Module) -> None:
    cfg = model.config
    beta = deepnorm_beta_init(cfg.num_hidden_layers)
    for module in model.modules():
        if isinstance(module, LightningAttention):
            w = module.qkv_proj.weight.view(cfg.num_attention_heads, 3, cfg.head_dim, cfg.hidden_size)
            for part, gain in ((0, 1.0), (1, 1.0), (2, beta)):  # q, k, v rows of every head
                block = torch.empty(cfg.attn_width, cfg.hidden_size, dtype=w.dtype, device=w.device)
                _xavier(block, gain)
                w[:, part] = block.view(cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size)
            _xavier(module.output_gate.weight, beta)
            _xavier(module.out_proj.weight, beta)
        elif isinstance(module, SoftmaxAttention):
            _xavier(module.q_proj.weight, 1.0)
            _xavier(module.k_proj.weight, 1.0)
            _xavier(module.v_proj.weight, beta)
            _xavier(module.o_proj.weight, beta)
        elif isinstance(module, Experts):
            i = module.down_proj.shape[-1]
            for e in range(module.gate_up_proj.shape[0]):
                _xavier(module.gate_up_proj[e, :i], beta)
                _xavier(module.gate_up_proj[e, i:], beta)
                _xavier(module.down_proj[e], beta)
        elif isinstance(module, MoE):
            _xavier(module.gate.weight, 1.0)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
    model.model.embed_tokens.weight.normal_(0.0, cfg.initializer_range)
    if not cfg.tie_word_embeddings:
        model.lm_head.weight.normal_(0.0, cfg.initializer_range)
