"""Model configuration: the ModelConfig dataclass, the model presets (MODEL_PRESETS), the two HF
config dialects (translated by hf_config.py) and parameter / FLOP / memory accounting (SPEC §1,
§6, §8).

A *model preset* fixes a model's shapes (`ModelConfig.from_preset("1b")`, `info --preset 1b`);
a *run preset* (minimax01.train.presets.RUN_PRESETS, `train --preset demo`) is a whole training
run: a model preset plus data, optimizer and loop settings."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .dtypes import FLOAT_DTYPES
from .hf_config import FULL, LINEAR, SLIDING, fields_to_hf, hf_to_fields

# SLIDING: softmax attention over the last `sliding_window` keys (ours, not in the released model)
LAYER_TYPES = (LINEAR, FULL, SLIDING)

# Sanity bounds, checked before anything is built: a config.json is input from anywhere, and
# building a model of 100,000 layers on the meta device alone takes minutes. MiniMax-Text-01
# has 80 layers of 32 experts; the largest published MoEs have a few hundred experts per layer.
MAX_LAYERS = 1024
MAX_EXPERTS = 4096
MAX_LAYER_EXPERTS = 1 << 17       # layers x experts (the legacy dialect stores 3 tensors each)
MAX_DIM = 1 << 24                 # vocab, hidden, intermediate, attention width
MAX_PARAMETERS = 1 << 50          # about 2,500 x MiniMax-Text-01


def hybrid_layer_types(num_layers: int, period: int = 8) -> list[str]:
    """Layer i is softmax ("full") attention when i % period == period - 1, else lightning."""
    return [FULL if i % period == period - 1 else LINEAR for i in range(num_layers)]


def deepnorm_alpha(num_layers: int) -> float:
    """DeepNorm residual scale (2N)^(1/4) (arXiv 2203.00555)."""
    return (2 * num_layers) ** 0.25


def deepnorm_beta_init(num_layers: int) -> float:
    """DeepNorm init gain (8N)^(-1/4) for value/output/expert matrices."""
    return (8 * num_layers) ** -0.25


@dataclass
class ModelConfig:
    """Everything that fixes a MiniMax-01-family model's shapes and numerics.

    Field names follow the transformers-native MiniMax config where one exists. `None` alphas are
    filled in by `__post_init__` (DeepNorm alpha with postnorm, 1.0 otherwise); `layer_types`
    defaults to the Text-01 pattern (softmax every 8th layer)."""

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    rotary_dim: int = 16
    rope_theta: float = 10_000_000.0
    layer_types: list[str] | None = None
    sliding_window: int | None = None  # keys a sliding_attention query sees, its own included
    num_local_experts: int = 4
    num_experts_per_tok: int = 2
    rms_norm_eps: float = 1e-5
    lightning_norm_eps: float = 1e-6
    postnorm: bool = True
    full_attn_alpha: float | None = None
    full_attn_beta: float = 1.0
    linear_attn_alpha: float | None = None
    linear_attn_beta: float = 1.0
    mlp_alpha: float | None = None
    mlp_beta: float = 1.0
    block_size: int = 256
    router_aux_loss_coef: float = 0.001
    capacity_factor: float | None = None
    max_position_embeddings: int = 10_240_000
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        self._check_layer_count()  # before building the per-layer lists below
        if self.layer_types is None:
            self.layer_types = hybrid_layer_types(self.num_hidden_layers)
        elif isinstance(self.layer_types, (list, tuple)):
            self.layer_types = list(self.layer_types)
        default_alpha = deepnorm_alpha(self.num_hidden_layers) if self.postnorm is True else 1.0
        for name in ("full_attn_alpha", "linear_attn_alpha", "mlp_alpha"):
            if getattr(self, name) is None:
                setattr(self, name, default_alpha)
        self.validate()

    # ------------------------------------------------------------------ validation
    def _bad(self, name: str, why: str) -> ValueError:
        return ValueError(f"ModelConfig.{name}: {why} (got {getattr(self, name)!r})")

    def _check_layer_count(self) -> None:
        n = self.num_hidden_layers
        if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= MAX_LAYERS:
            raise self._bad("num_hidden_layers", f"must be an integer in [1, {MAX_LAYERS}]")

    def validate(self) -> None:
        """Raise ValueError naming the first bad field: types (an int is not 1.5, a bool is not
        "false"), finiteness, ranges and the sanity bounds above."""
        bad = self._bad
        self._check_layer_count()
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "num_local_experts",
                     "num_experts_per_tok", "block_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise bad(name, "must be a positive integer")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "head_dim"):
            if getattr(self, name) > MAX_DIM:
                raise bad(name, f"must be at most {MAX_DIM}")
        if self.attn_width > MAX_DIM:
            raise bad("num_attention_heads", f"times head_dim={self.head_dim} must be at most "
                                             f"{MAX_DIM}")
        if self.num_local_experts > MAX_EXPERTS:
            raise bad("num_local_experts", f"must be at most {MAX_EXPERTS}")
        if self.num_local_experts * self.num_hidden_layers > MAX_LAYER_EXPERTS:
            raise bad("num_local_experts", f"times num_hidden_layers={self.num_hidden_layers} "
                                           f"must be at most {MAX_LAYER_EXPERTS}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad("num_key_value_heads",
                      f"must divide num_attention_heads={self.num_attention_heads}")
        if (not isinstance(self.rotary_dim, int) or isinstance(self.rotary_dim, bool)
                or self.rotary_dim < 0 or self.rotary_dim % 2):
            raise bad("rotary_dim", "must be a non-negative even integer")
        if self.rotary_dim > self.head_dim:
            raise bad("rotary_dim", f"must be at most head_dim={self.head_dim}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise bad("num_experts_per_tok",
                      f"must be at most num_local_experts={self.num_local_experts}")
        if not isinstance(self.layer_types, list):
            raise bad("layer_types", "must be a list of layer types")
        if len(self.layer_types) != self.num_hidden_layers:
            raise bad("layer_types", f"needs one entry per layer ({self.num_hidden_layers})")
        for i, t in enumerate(self.layer_types):
            if t not in LAYER_TYPES:
                raise ValueError(f"ModelConfig.layer_types[{i}]: unknown layer type {t!r}; "
                                 f"expected one of {LAYER_TYPES}")
        self._validate_sliding()
        for name in ("postnorm", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")
        positive = ("rope_theta", "rms_norm_eps", "lightning_norm_eps", "initializer_range",
                    "full_attn_alpha", "linear_attn_alpha", "mlp_alpha")
        for name in positive + ("full_attn_beta", "linear_attn_beta", "mlp_beta",
                                "router_aux_loss_coef"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad(name, "must be a number")
            if not math.isfinite(value):
                raise bad(name, "must be finite")
            if name in positive and not value > 0:
                raise bad(name, "must be positive")
        if self.router_aux_loss_coef < 0:
            raise bad("router_aux_loss_coef", "must be non-negative")
        cf = self.capacity_factor
        if cf is not None and (isinstance(cf, bool) or not isinstance(cf, (int, float))
                               or not math.isfinite(cf) or not cf > 0):
            raise bad("capacity_factor", "must be a positive finite number or None (dropless)")
        if self.dtype not in FLOAT_DTYPES:
            raise bad("dtype", f"must be one of {', '.join(FLOAT_DTYPES)}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            tid = getattr(self, name)
            if tid is not None and (not isinstance(tid, int) or isinstance(tid, bool)
                                    or not 0 <= tid < self.vocab_size):
                raise bad(name, f"must be a token id below vocab_size={self.vocab_size}")
        if self.num_parameters() > MAX_PARAMETERS:
            raise ValueError(f"ModelConfig: {self.num_parameters():.3g} parameters is more than "
                             f"the sanity bound {MAX_PARAMETERS:.3g}")

    def _validate_sliding(self) -> None:
        w, bad = self.sliding_window, self._bad
        if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w <= 0):
            raise bad("sliding_window", "must be a positive integer or None")
        if w is not None and w > self.max_position_embeddings:
            raise bad("sliding_window", f"must be at most max_position_embeddings="
                                        f"{self.max_position_embeddings}")
        has = SLIDING in self.layer_types
        if has and w is None:
            raise bad("sliding_window", "must be set when a layer is sliding_attention")
        if w is not None and not has:
            raise bad("sliding_window", "is set but no layer is sliding_attention")

    # ------------------------------------------------------------------ derived
    @property
    def attn_width(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def num_linear_layers(self) -> int:
        return sum(t == LINEAR for t in self.layer_types)

    @property
    def num_full_layers(self) -> int:
        return sum(t == FULL for t in self.layer_types)

    @property
    def num_sliding_layers(self) -> int:
        return sum(t == SLIDING for t in self.layer_types)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed. Alphas derived from the layer count are re-derived when
        the layer count changes and they were not given explicitly."""
        data = self.to_dict()
        if "num_hidden_layers" in changes and "layer_types" not in changes:
            data["layer_types"] = None  # the default pattern has no sliding layers
            if "sliding_window" not in changes:
                data["sliding_window"] = None
        if "num_hidden_layers" in changes or "postnorm" in changes:
            old_default = deepnorm_alpha(self.num_hidden_layers) if self.postnorm else 1.0
            for name in ("full_attn_alpha", "linear_attn_alpha", "mlp_alpha"):
                if name not in changes and math.isclose(data[name], old_default):
                    data[name] = None
        data.update(changes)
        return ModelConfig(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Build from our own field names; an unknown key is an error naming the closest field."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in data if k not in names]
        if unknown:
            import difflib

            k = unknown[0]
            close = difflib.get_close_matches(k, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"ModelConfig: unknown field {k!r}{hint}")
        return cls(**data)

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A model preset (MODEL_PRESETS) with some fields overridden."""
        if name not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {name!r}; available: "
                             f"{', '.join(MODEL_PRESETS)}")
        data = dict(MODEL_PRESETS[name])
        data.update(overrides)
        return cls(**data)

    # ------------------------------------------------------------------ HF dialects
    @classmethod
    def from_hf_config(cls, src: dict[str, Any] | str | Path) -> "ModelConfig":
        """Read a HF `config.json` (a dict, a file, or a checkpoint folder) in either dialect."""
        if not isinstance(src, dict):
            path = Path(src)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"no config.json at {path}")
            src = json.loads(path.read_text())
        return cls(**hf_to_fields(src))

    def to_hf_config(self, dialect: str = "legacy") -> dict[str, Any]:
        """The config.json dict for `dialect` "legacy" (official MiniMaxText01) or "hf"
        (transformers-native `minimax`)."""
        return fields_to_hf(self.to_dict(), dialect)

    # ------------------------------------------------------------------ accounting
    def num_parameters(self, active: bool = False, embeddings: bool = True) -> int:
        """Parameter count. `active=True`: parameters used per token (top-k experts only).
        `embeddings=False` leaves out the token embedding and the lm_head."""
        h, i, e = self.hidden_size, self.intermediate_size, self.num_local_experts
        experts_used = self.num_experts_per_tok if active else e
        moe = e * h + experts_used * 3 * h * i
        lightning = 3 * self.attn_width * h + 2 * self.attn_width * h + self.attn_width
        softmax = 2 * self.attn_width * h + 2 * self.kv_width * h
        total = 0
        for t in self.layer_types:
            total += 2 * h + moe + (lightning if t == LINEAR else softmax)
        total += h  # final norm
        if embeddings:
            total += self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return total

    def flops_per_token(self, seq_len: int, training: bool = False) -> float:
        """Model FLOPs per token at context `seq_len` (matmuls only, causal attention averaged over
        positions). Training = 3x forward (forward + backward), no recompute counted."""
        h, d = self.hidden_size, self.head_dim
        dense = 2 * (self.num_parameters(active=True, embeddings=False)
                     - self.num_hidden_layers * self.num_local_experts * h)  # router is tiny; count it out
        dense += 2 * self.num_local_experts * h * self.num_hidden_layers
        dense += 2 * self.vocab_size * h  # lm_head
        heads = self.num_attention_heads
        # softmax: QK^T and PV, causal -> average context seq_len/2 each
        attn = self.num_full_layers * 2 * 2 * heads * d * (seq_len / 2)
        # sliding window W: a query at position p sees min(p, W) keys; averaged over [0, seq_len)
        if self.num_sliding_layers:
            w = self.sliding_window
            keys = seq_len / 2 if seq_len <= w else w - w * w / (2 * seq_len)
            attn += self.num_sliding_layers * 2 * 2 * heads * d * keys
        # lightning, chunked with block B: intra (causal, avg B/2 keys) + inter state (q S) + state
        # update (k^T v): 2*d*B/2*2 + 2*d*d*2 per head per token
        b = min(self.block_size, seq_len)
        lin = self.num_linear_layers * heads * (2 * 2 * d * (b / 2) + 2 * 2 * d * d)
        fwd = dense + attn + lin
        return 3 * fwd if training else fwd

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K/V bytes that grow with the context: the full softmax layers'."""
        return self.num_full_layers * 2 * self.kv_width * dtype_bytes

    def sliding_cache_bytes(self, dtype_bytes: int = 2) -> int:
        """Bytes of K/V per sequence the sliding-window layers keep, whatever the length."""
        if not self.num_sliding_layers:
            return 0
        return self.num_sliding_layers * 2 * self.kv_width * self.sliding_window * dtype_bytes

    def lightning_state_bytes(self) -> int:
        """Bytes of fp32 lightning state per sequence, independent of context length."""
        return self.num_linear_layers * self.num_attention_heads * self.head_dim * self.head_dim * 4

    def weight_bytes(self, bytes_per_param: float = 2.0) -> float:
        return self.num_parameters() * bytes_per_param


_TEXT01_LAYERS = 80

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # Tiny, for tests: both layer kinds, GQA, partial rotary, 4 experts.
    "debug": dict(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, rotary_dim=8,
                  layer_types=hybrid_layer_types(4, 2), num_local_experts=4, num_experts_per_tok=2,
                  block_size=16, rope_theta=10_000.0, bos_token_id=256, eos_token_id=257,
                  pad_token_id=258, dtype="float32"),
    # Trains on a 2-core CPU in minutes with the byte tokenizer.
    "demo": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, rotary_dim=16,
                 layer_types=hybrid_layer_types(4, 4), num_local_experts=4, num_experts_per_tok=2,
                 block_size=64, rope_theta=10_000.0, bos_token_id=256, eos_token_id=257,
                 pad_token_id=258, dtype="float32"),
    # ~100M total parameters.
    "small": dict(vocab_size=32768, hidden_size=512, intermediate_size=256, num_hidden_layers=16,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=64, rotary_dim=32,
                  layer_types=hybrid_layer_types(16, 8), num_local_experts=8, num_experts_per_tok=2,
                  block_size=256, rope_theta=1_000_000.0, bos_token_id=256, eos_token_id=257,
                  pad_token_id=258),
    # ~1B total, head dim 128, hybrid 7:1. Fixed shape: benchmarks compare against it over time.
    "1b": dict(vocab_size=32768, hidden_size=2048, intermediate_size=768, num_hidden_layers=16,
               num_attention_heads=16, num_key_value_heads=4, head_dim=128, rotary_dim=64,
               layer_types=hybrid_layer_types(16, 8), num_local_experts=8, num_experts_per_tok=2,
               block_size=256, rope_theta=10_000_000.0, bos_token_id=256, eos_token_id=257,
               pad_token_id=258),
    # Exactly the released MiniMax-Text-01.
    "minimax-text-01": dict(vocab_size=200064, hidden_size=6144, intermediate_size=9216,
                            num_hidden_layers=_TEXT01_LAYERS, num_attention_heads=64,
                            num_key_value_heads=8, head_dim=128, rotary_dim=64,
                            rope_theta=10_000_000.0, layer_types=hybrid_layer_types(_TEXT01_LAYERS, 8),
                            num_local_experts=32, num_experts_per_tok=2, block_size=256,
                            router_aux_loss_coef=0.001, max_position_embeddings=10_240_000,
                            postnorm=True),
}
