"""Translation between ModelConfig fields and the two HF `config.json` dialects (SPEC §6):
"legacy" (official MiniMaxText01 remote code, transformers 4.53-4.57) and "hf"
(transformers-native `model_type: minimax`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import ModelConfig

LEGACY_MODEL_TYPE = "MiniMaxText01"
HF_MODEL_TYPE = "minimax"

# fields with the same name and meaning in both dialects and in ModelConfig
_COMMON = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
           "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
           "num_local_experts", "num_experts_per_tok", "router_aux_loss_coef",
           "max_position_embeddings", "tie_word_embeddings", "initializer_range",
           "bos_token_id", "eos_token_id", "pad_token_id")

_LEGACY_RESIDUAL = {"full_attn_alpha": "layernorm_full_attention_alpha",
                    "full_attn_beta": "layernorm_full_attention_beta",
                    "linear_attn_alpha": "layernorm_linear_attention_alpha",
                    "linear_attn_beta": "layernorm_linear_attention_beta",
                    "mlp_alpha": "layernorm_mlp_alpha",
                    "mlp_beta": "layernorm_mlp_beta"}
_HF_RESIDUAL = {k: k + "_factor" for k in _LEGACY_RESIDUAL}


def _dialect_of(cfg: dict[str, Any]) -> str:
    model_type = cfg.get("model_type")
    if model_type == LEGACY_MODEL_TYPE or "attn_type_list" in cfg:
        return "legacy"
    if model_type == HF_MODEL_TYPE or "layer_types" in cfg:
        return "hf"
    raise ValueError(f"config.json is neither MiniMaxText01 nor minimax (model_type={model_type!r})")


def hf_to_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig keyword arguments from a config.json dict of either dialect."""
    dialect = _dialect_of(cfg)
    out: dict[str, Any] = {k: cfg[k] for k in _COMMON if k in cfg and cfg[k] is not None}
    if isinstance(out.get("eos_token_id"), list):
        out["eos_token_id"] = out["eos_token_id"][0] if out["eos_token_id"] else None
    if out.get("head_dim") is None:
        out["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    if cfg.get("shared_intermediate_size", 0):
        raise ValueError("config.json: shared experts (shared_intermediate_size > 0) are not supported")
    if "torch_dtype" in cfg or "dtype" in cfg:
        dtype = str(cfg.get("dtype") or cfg.get("torch_dtype")).replace("torch.", "")
        if dtype in ("float32", "bfloat16", "float16"):
            out["dtype"] = dtype
    if dialect == "legacy":
        types = cfg.get("attn_type_list")
        if types is not None:
            mapping = {0: "linear_attention", 1: "full_attention"}
            bad = [t for t in types if t not in mapping]
            if bad:
                raise ValueError(f"config.json: attn_type_list holds {bad[0]!r}; expected 0 or 1")
            out["layer_types"] = [mapping[t] for t in types]
        for ours, theirs in _LEGACY_RESIDUAL.items():
            if theirs in cfg:
                out[ours] = float(cfg[theirs])
        out["postnorm"] = bool(cfg.get("postnorm", False))
        if "rope_theta" in cfg:
            out["rope_theta"] = float(cfg["rope_theta"])
        out["rotary_dim"] = int(cfg.get("rotary_dim", out["head_dim"]))
        if "block_size" in cfg:
            out["block_size"] = int(cfg["block_size"])
    else:
        if cfg.get("layer_types") is not None:
            out["layer_types"] = list(cfg["layer_types"])
        for ours, theirs in _HF_RESIDUAL.items():
            if theirs in cfg:
                out[ours] = float(cfg[theirs])
        out["postnorm"] = True  # transformers' MiniMax is always post-norm
        rope = cfg.get("rope_parameters") or {}
        theta = rope.get("rope_theta", cfg.get("rope_theta"))
        if theta is not None:
            out["rope_theta"] = float(theta)
        factor = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        out["rotary_dim"] = int(round(float(factor) * out["head_dim"]))
        if "block_size" in cfg:
            out["block_size"] = int(cfg["block_size"])
    out.update(cfg.get("minimax01") or {})
    _read_sliding(cfg, dialect, out)
    return out


def _read_sliding(cfg: dict[str, Any], dialect: str, out: dict[str, Any]) -> None:
    """Sliding-window layers (SPEC-external, ours). transformers' MiniMax applies a non-null
    `sliding_window` to every softmax layer, so the hf dialect reads those layers as
    sliding_attention; our own mixed layouts carry "sliding_attention" entries and the window in
    the `minimax01` block. The legacy dialect has no sliding attention: refused."""
    top = cfg.get("sliding_window")
    if dialect == "legacy":
        if top is not None or "sliding_attention" in (out.get("layer_types") or []) \
                or out.get("sliding_window") is not None:
            raise ValueError("config.json: sliding-window attention (sliding_window / "
                             "sliding_attention) cannot be expressed in the legacy MiniMaxText01 "
                             "dialect; save the model with dialect='hf'")
        return
    if top is not None:
        types = out.get("layer_types") or []
        out["layer_types"] = ["sliding_attention" if t == "full_attention" else t for t in types]
        out["sliding_window"] = int(top)


def fields_to_hf(config: "ModelConfig", dialect: str) -> dict[str, Any]:
    if dialect not in ("legacy", "hf"):
        raise ValueError(f"dialect must be 'legacy' or 'hf', got {dialect!r}")
    out: dict[str, Any] = {k: getattr(config, k) for k in _COMMON}
    out.update(hidden_act="silu", attention_dropout=0.0, output_router_logits=False,
               router_jitter_noise=0.0, sliding_window=None, use_cache=True)
    private: dict[str, Any] = {}
    layer_types = list(config.layer_types)
    if "sliding_attention" in layer_types:
        if dialect == "legacy":
            raise ValueError("the 'legacy' dialect (official MiniMaxText01) cannot express "
                             "sliding_attention layers; use dialect='hf'")
        if "full_attention" not in layer_types:
            # exactly what transformers' MiniMax computes: its sliding_window covers every
            # softmax layer
            layer_types = ["full_attention" if t == "sliding_attention" else t for t in layer_types]
            out["sliding_window"] = config.sliding_window
        else:  # full and sliding layers mixed: ours alone; transformers refuses the layer type
            private["sliding_window"] = config.sliding_window
    if dialect == "legacy":
        out.update(architectures=["MiniMaxText01ForCausalLM"], model_type=LEGACY_MODEL_TYPE,
                   attn_type_list=[0 if t == "linear_attention" else 1 for t in config.layer_types],
                   postnorm=config.postnorm, rope_theta=config.rope_theta,
                   rotary_dim=config.rotary_dim, shared_intermediate_size=0,
                   block_size=config.block_size, torch_dtype=config.dtype)
        for ours, theirs in _LEGACY_RESIDUAL.items():
            out[theirs] = getattr(config, ours)
    else:
        if not config.postnorm:
            raise ValueError("the 'hf' dialect (transformers' MiniMax) cannot express postnorm=False; "
                             "use dialect='legacy'")
        out.update(architectures=["MiniMaxForCausalLM"], model_type=HF_MODEL_TYPE,
                   layer_types=layer_types, block_size=config.block_size,
                   rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta,
                                    "partial_rotary_factor": config.rotary_dim / config.head_dim},
                   dtype=config.dtype)
        for ours, theirs in _HF_RESIDUAL.items():
            out[theirs] = getattr(config, ours)
    # our own fields that neither dialect has, kept so a round trip is lossless
    out["minimax01"] = {"lightning_norm_eps": config.lightning_norm_eps,
                        "capacity_factor": config.capacity_factor, **private}
    return out


def preferred_dialect(config: "ModelConfig") -> str:
    """The dialect to write when none is asked for: legacy (the official layout), or hf where
    legacy cannot express the config (sliding-window layers)."""
    return "hf" if "sliding_attention" in config.layer_types else "legacy"
