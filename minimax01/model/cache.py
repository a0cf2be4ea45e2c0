"""HybridCache: the generation cache of SPEC §7 for a batch of (left-padded) sequences.

Lightning layers keep one fp32 state [B, H, D, D] each, whatever the context length; softmax
layers keep post-RoPE K and V [B, Hkv, max_length, D], preallocated, in the model dtype. All rows
share slot indices; a key mask hides padding. Positions count real tokens only (pads excluded).

Layers talk to a cache through three calls, so other caches (the serving engine's slot pool)
can plug in: `prepare(valid, cu_seqlens) -> position_ids` before the layers, `lightning(...)` and
`attend(...)` inside them, `commit()` after."""

from __future__ import annotations

import torch

from ..config import LINEAR, ModelConfig
from ..ops import lightning_attn, lightning_decode
from ..ops.attention import cached_attention


class HybridCache:
    def __init__(self, config: ModelConfig, batch_size: int, max_length: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        if max_length <= 0 or batch_size <= 0:
            raise ValueError("HybridCache needs a positive batch_size and max_length")
        h, d, hkv = config.num_attention_heads, config.head_dim, config.num_key_value_heads
        self.batch_size, self.max_length = batch_size, max_length
        self.states: dict[int, torch.Tensor] = {}
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        for i, kind in enumerate(config.layer_types):
            if kind == LINEAR:
                self.states[i] = torch.zeros(batch_size, h, d, d, device=device, dtype=torch.float32)
            else:
                self.keys[i] = torch.zeros(batch_size, hkv, max_length, d, device=device, dtype=dtype)
                self.values[i] = torch.zeros_like(self.keys[i])
        self.key_valid = torch.zeros(batch_size, max_length, dtype=torch.bool, device=device)
        self.length = 0  # slots filled, the same for every row
        self.seen = torch.zeros(batch_size, dtype=torch.long, device=device)  # real tokens per row
        self._step: tuple[int, torch.Tensor] | None = None

    def prepare(self, valid: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
        if cu_seqlens is not None:
            raise ValueError("HybridCache takes padded batches, not packed (cu_seqlens) input")
        b, t = valid.shape
        if b != self.batch_size:
            raise ValueError(f"cache was made for batch {self.batch_size}, got {b}")
        if self.length + t > self.max_length:
            raise ValueError(f"cache is full: {self.length} + {t} tokens > max_length "
                             f"{self.max_length}")
        self.key_valid[:, self.length:self.length + t] = valid
        self._step = (t, valid)
        return (self.seen[:, None] + valid.long().cumsum(-1) - 1).clamp(min=0)

    def lightning(self, layer_idx, q, k, v, slope, ctx):
        state = self.states[layer_idx]
        if q.shape[1] == 1:  # decode: in-place state update
            return lightning_decode(q[:, 0], k[:, 0], v[:, 0], state, slope)[:, None]
        o, new_state = lightning_attn(q, k, v, slope, initial_state=state, output_final_state=True)
        state.copy_(new_state)
        return o

    def attend(self, layer_idx, q, k, v, scale, ctx):
        start, t = self.length, q.shape[1]
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[:, :, start:start + t] = k.transpose(1, 2).to(keys.dtype)
        values[:, :, start:start + t] = v.transpose(1, 2).to(values.dtype)
        end = start + t
        return cached_attention(q, keys[:, :, :end], values[:, :, :end], self.key_valid[:, :end],
                                scale=scale)

    def commit(self) -> None:
        t, valid = self._step
        self.length += t
        self.seen += valid.sum(-1)
        self._step = None

    def memory_bytes(self) -> int:
        tensors = list(self.states.values()) + list(self.keys.values()) + list(self.values.values())
        return sum(x.numel() * x.element_size() for x in tensors)
