"""HybridCache: the generation cache of SPEC §7 for a batch of (left-padded) sequences.

Lightning layers keep one fp32 state [B, H, D, D] each, whatever the context length; softmax
layers keep post-RoPE K and V [B, Hkv, max_length, D], preallocated, in the model dtype. All rows
share slot indices; a key mask hides padding. Positions count real tokens only (pads excluded).
Sliding-window layers keep only the last `window - 1` slots' K/V ([B, window - 1, Hkv, D]): with
left padding (the only padding they accept) those hold every key a new query can see.

Layers talk to a cache through three calls, so other caches (the serving engine's slot pool)
can plug in: `prepare(valid, cu_seqlens) -> position_ids` before the layers, `lightning(...)` and
`attend(...)` inside them, `commit()` after."""

from __future__ import annotations

import torch

from ..config import LINEAR, SLIDING, ModelConfig
from ..ops import lightning_attn, lightning_decode
from ..ops.attention import cached_attention, windowed_attention


class HybridCache:
    supports_sliding_window = True  # the layers refuse sliding_attention with caches without it

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        if max_length <= 0 or batch_size <= 0:
            raise ValueError("HybridCache needs a positive batch_size and max_length")
        h, d, hkv = config.num_attention_heads, config.head_dim, config.num_key_value_heads
        self.batch_size, self.max_length = batch_size, max_length
        self.states: dict[int, torch.Tensor] = {}
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.window = config.sliding_window
        # a step's queries see at most window-1 earlier slots, and never more than the cache holds
        keep = min(self.window or 1, max_length) - 1
        self.ring_keys: dict[int, torch.Tensor] = {}  # sliding layers: the last window-1 slots
        self.ring_values: dict[int, torch.Tensor] = {}
        for i, kind in enumerate(config.layer_types):
            if kind == LINEAR:
                self.states[i] = torch.zeros(batch_size, h, d, d, device=device, dtype=torch.float32)
            elif kind == SLIDING:
                self.ring_keys[i] = torch.zeros(batch_size, keep, hkv, d, device=device, dtype=dtype)
                self.ring_values[i] = torch.zeros_like(self.ring_keys[i])
            else:
                self.keys[i] = torch.zeros(batch_size, hkv, max_length, d, device=device, dtype=dtype)
                self.values[i] = torch.zeros_like(self.keys[i])
        self.ring_valid = torch.zeros(batch_size, keep, dtype=torch.bool, device=device)
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
        if self.ring_keys and (bool((valid[:, :-1] & ~valid[:, 1:]).any())
                               or bool(((self.seen > 0) & ~valid.all(-1)).any())):
            raise ValueError("HybridCache: sliding_attention layers take left-padded input only "
                             "(no padding after a sequence's first token)")
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
        if layer_idx in self.ring_keys:
            return self._attend_window(layer_idx, q, k, v, scale)
        start, t = self.length, q.shape[1]
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[:, :, start:start + t] = k.transpose(1, 2).to(keys.dtype)
        values[:, :, start:start + t] = v.transpose(1, 2).to(values.dtype)
        end = start + t
        return cached_attention(q, keys[:, :, :end], values[:, :, :end], self.key_valid[:, :end],
                                scale=scale)

    def _attend_window(self, layer_idx, q, k, v, scale):
        """The step's queries against the ring (the last window-1 slots) and the step's own keys;
        then the ring moves on to the newest window-1 slots."""
        _, valid = self._step
        ring_k, ring_v = self.ring_keys[layer_idx], self.ring_values[layer_idx]
        keys = torch.cat([ring_k, k.to(ring_k.dtype)], 1)
        values = torch.cat([ring_v, v.to(ring_v.dtype)], 1)
        key_valid = torch.cat([self.ring_valid, valid], 1)
        o = windowed_attention(q, keys, values, self.window, key_valid=key_valid, scale=scale)
        keep = ring_k.shape[1]
        if keep:
            ring_k.copy_(keys[:, keys.shape[1] - keep:])
            ring_v.copy_(values[:, values.shape[1] - keep:])
        return o

    def commit(self) -> None:
        t, valid = self._step
        self.length += t
        self.seen += valid.sum(-1)
        keep = self.ring_valid.shape[1]
        if keep:
            self.ring_valid.copy_(torch.cat([self.ring_valid, valid], 1)[:, -keep:])
        self._step = None

    def memory_bytes(self) -> int:
        tensors = (list(self.states.values()) + list(self.keys.values()) + list(self.values.values())
                   + list(self.ring_keys.values()) + list(self.ring_values.values()))
        return sum(x.numel() * x.element_size() for x in tensors)
