"""Pure tensor functions (no modules, no config): lightning attention, softmax attention, MoE
routing and expert compute, RoPE and RMSNorm."""

from .lightning import lightning_attn, lightning_decode

__all__ = ["lightning_attn", "lightning_decode"]
