"""Translation between ModelConfig fields (a plain dict) and the two HF `config.json` dialects
(SPEC §6): "legacy" (official MiniMaxText01 remote code, transformers 4.53-4.57) and "hf"
(transformers-native `model_type: minimax`).

This module knows nothing of ModelConfig (config.py imports it, never the reverse): it reads a
config.json dict into field values, and writes field values as a config.json dict. Reading is
strict, because a config.json is input from anywhere: every value is checked for its JSON type
(a bool is `true`/`false`, not "false"; an integer is not 1.5; a number is finite) and a bad one
is a ValueError naming the config.json key. Ranges are ModelConfig.validate's job."""

from __future__ import annotations

import math
from typing import Any

from .dtypes import canonical_name

LEGACY_MODEL_TYPE = "MiniMaxText01"
M1_MODEL_TYPE = "minimax_m1"  # MiniMax-M1 (MiniMaxM1ForCausalLM): the legacy format, SPEC §10
HF_MODEL_TYPE = "minimax"
LINEAR, FULL = "linear_attention", "full_attention"
SLIDING = "sliding_attention"  # softmax over the last `sliding_window` keys (ours, not in Text-01)

# fields with the same name and meaning in both dialects and in ModelConfig, by JSON type
REQUIRED_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_local_experts", "num_experts_per_tok")
OPTIONAL_INTS = ("num_key_value_heads", "head_dim", "max_position_embeddings")
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
FLOATS = ("rms_norm_eps", "router_aux_loss_coef", "initializer_range")
BOOLS = ("tie_word_embeddings",)
_COMMON = REQUIRED_INTS + OPTIONAL_INTS + TOKEN_IDS + FLOATS + BOOLS

_LEGACY_RESIDUAL = {"full_attn_alpha": "layernorm_full_attention_alpha",
                    "full_attn_beta": "layernorm_full_attention_beta",
                    "linear_attn_alpha": "layernorm_linear_attention_alpha",
                    "linear_attn_beta": "layernorm_linear_attention_beta",
                    "mlp_alpha": "layernorm_mlp_alpha",
                    "mlp_beta": "layernorm_mlp_beta"}
_HF_RESIDUAL = {k: k + "_factor" for k in _LEGACY_RESIDUAL}
# our own fields that neither dialect has, kept under "minimax01" so a round trip is lossless
# (sliding_window: only where transformers' own `sliding_window` cannot say it, see _read_sliding)
OWN_FIELDS = {"lightning_norm_eps": "float", "capacity_factor": "float?", "sliding_window": "int?"}


# ---------------------------------------------------------------------- typed readers
def _bad(key: str, why: str, value: Any) -> ValueError:
    return ValueError(f"config.json: {key} {why} (got {value!r})")


def read_int(value: Any, key: str) -> int:
    """A JSON integer (an integral float such as 8.0 is accepted; 1.5, NaN, "8", true are not)."""
    if isinstance(value, bool):
        raise _bad(key, "must be an integer", value)
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    if not isinstance(value, int):
        raise _bad(key, "must be an integer", value)
    return value


def read_float(value: Any, key: str) -> float:
    """A finite JSON number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(key, "must be a number", value)
    if not math.isfinite(value):
        raise _bad(key, "must be finite", value)
    return float(value)


def read_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise _bad(key, "must be true or false", value)
    return value


def config_dtype(cfg: dict[str, Any]) -> str | None:
    """The weights' dtype a config.json states ("dtype", or the older "torch_dtype"), as a
    FLOAT_DTYPES name; None when it states none. An unknown dtype is an error."""
    for key in ("dtype", "torch_dtype"):
        value = cfg.get(key)
        if value is not None:
            return canonical_name(value, f"config.json: {key}")
    return None


def dialect_of(cfg: dict[str, Any]) -> str:
    model_type = cfg.get("model_type")
    if model_type in (LEGACY_MODEL_TYPE, M1_MODEL_TYPE) or "attn_type_list" in cfg:
        return "legacy"
    if model_type == HF_MODEL_TYPE or "layer_types" in cfg:
        return "hf"
    raise ValueError(f"config.json is neither MiniMaxText01 nor minimax (model_type={model_type!r})")


# ---------------------------------------------------------------------- reading
def hf_to_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig keyword arguments from a config.json dict of either dialect. A missing core
    size is a KeyError naming it; a value of the wrong JSON type a ValueError naming its key."""
    if not isinstance(cfg, dict):
        raise ValueError("config.json must be a JSON object")
    dialect = dialect_of(cfg)
    out: dict[str, Any] = {}
    for k in REQUIRED_INTS:
        if cfg.get(k) is None:
            raise KeyError(k)
        out[k] = read_int(cfg[k], k)
    for k in OPTIONAL_INTS:
        if cfg.get(k) is not None:
            out[k] = read_int(cfg[k], k)
    for k in FLOATS:
        if cfg.get(k) is not None:
            out[k] = read_float(cfg[k], k)
    for k in BOOLS:
        if cfg.get(k) is not None:
            out[k] = read_bool(cfg[k], k)
    for k in TOKEN_IDS:
        value = cfg.get(k)
        if isinstance(value, list) and k == "eos_token_id":  # several stop ids: keep the first
            value = value[0] if value else None
        if value is not None:
            out[k] = read_int(value, k)
    out.setdefault("num_key_value_heads", out["num_attention_heads"])  # HF's convention
    if "head_dim" not in out:
        out["head_dim"] = out["hidden_size"] // out["num_attention_heads"]
    shared = cfg.get("shared_intermediate_size")  # Text-01 configs: a list; MiniMax-M1: an int
    sizes = shared if isinstance(shared, list) else ([] if shared is None else [shared])
    if any(isinstance(x, bool) or not isinstance(x, int) for x in sizes):
        raise _bad("shared_intermediate_size", "must be an integer or a list of integers", shared)
    if any(sizes):
        raise ValueError("config.json: shared experts (shared_intermediate_size > 0) are not "
                         "supported")
    dtype = config_dtype(cfg)
    if dtype is not None:
        out["dtype"] = dtype
    if dialect == "legacy":
        _read_legacy(cfg, out)
    else:
        _read_hf(cfg, out)
    if "block_size" in cfg:
        out["block_size"] = read_int(cfg["block_size"], "block_size")
    own = cfg.get("minimax01")
    if own is not None and not isinstance(own, dict):
        raise _bad("minimax01", "must be an object", own)
    own = own or {}
    if dialect == "legacy":
        _refuse_legacy_sliding(cfg, own)
    for k, v in own.items():
        kind = OWN_FIELDS.get(k)
        if kind is None:
            raise ValueError(f"config.json: minimax01.{k}: unknown field (known: "
                             f"{', '.join(OWN_FIELDS)})")
        read = read_int if kind.startswith("int") else read_float
        out[k] = None if v is None and kind.endswith("?") else read(v, f"minimax01.{k}")
    if dialect == "hf":
        _read_sliding(cfg, out)
    return out


def _refuse_legacy_sliding(cfg: dict[str, Any], own: dict[str, Any]) -> None:
    """The legacy dialect has no sliding-window attention: a window there is refused, never
    dropped (that would silently become full attention)."""
    types = own.get("layer_types")
    if cfg.get("sliding_window") is not None or own.get("sliding_window") is not None \
            or (isinstance(types, list) and SLIDING in types):
        raise ValueError("config.json: sliding-window attention (sliding_window / "
                         "sliding_attention) cannot be expressed in the legacy MiniMaxText01 "
                         "dialect; save the model with dialect='hf'")


def _read_sliding(cfg: dict[str, Any], out: dict[str, Any]) -> None:
    """Sliding-window layers (SPEC-external, ours). transformers' MiniMax applies a non-null
    top-level `sliding_window` to every softmax layer, so those layers read as sliding_attention;
    our own mixed layouts (full and sliding layers) carry "sliding_attention" entries in
    `layer_types` and the window in the `minimax01` block."""
    top = cfg.get("sliding_window")
    if top is None:
        return
    window = read_int(top, "sliding_window")
    if out.get("sliding_window") not in (None, window):
        raise ValueError(f"config.json: sliding_window={window} and minimax01.sliding_window="
                         f"{out['sliding_window']} disagree")
    types = out.get("layer_types")
    if types is None:
        raise ValueError("config.json: sliding_window needs layer_types (which layers are "
                         "softmax layers)")
    if FULL not in types:  # no softmax layer for transformers to window: it changes nothing
        return
    out["layer_types"] = [SLIDING if t == FULL else t for t in types]
    out["sliding_window"] = window


def _read_legacy(cfg: dict[str, Any], out: dict[str, Any]) -> None:
    types = cfg.get("attn_type_list")
    if types is not None:
        if not isinstance(types, list):
            raise _bad("attn_type_list", "must be a list of 0 (lightning) and 1 (softmax)", types)
        for i, t in enumerate(types):
            if isinstance(t, bool) or t not in (0, 1):
                raise ValueError(f"config.json: attn_type_list[{i}] holds {t!r}; expected 0 or 1")
        out["layer_types"] = [LINEAR if t == 0 else FULL for t in types]
    for ours, theirs in _LEGACY_RESIDUAL.items():
        if cfg.get(theirs) is not None:
            out[ours] = read_float(cfg[theirs], theirs)
    out["postnorm"] = read_bool(cfg["postnorm"], "postnorm") if cfg.get("postnorm") is not None \
        else False
    if cfg.get("rope_theta") is not None:
        out["rope_theta"] = read_float(cfg["rope_theta"], "rope_theta")
    rotary = cfg.get("rotary_dim")
    out["rotary_dim"] = out["head_dim"] if rotary is None else read_int(rotary, "rotary_dim")


def _read_hf(cfg: dict[str, Any], out: dict[str, Any]) -> None:
    types = cfg.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
            raise _bad("layer_types", "must be a list of layer type names", types)
        out["layer_types"] = list(types)
    for ours, theirs in _HF_RESIDUAL.items():
        if cfg.get(theirs) is not None:
            out[ours] = read_float(cfg[theirs], theirs)
    out["postnorm"] = True  # transformers' MiniMax is always post-norm
    rope = cfg.get("rope_parameters")
    if rope is None:
        rope, where = {}, ""
    elif not isinstance(rope, dict):
        raise _bad("rope_parameters", "must be an object", rope)
    else:
        where = "rope_parameters."
    theta_key = "rope_theta" if rope.get("rope_theta") is not None else None
    if theta_key:
        out["rope_theta"] = read_float(rope["rope_theta"], where + "rope_theta")
    elif cfg.get("rope_theta") is not None:
        out["rope_theta"] = read_float(cfg["rope_theta"], "rope_theta")
    if rope.get("partial_rotary_factor") is not None:
        factor = read_float(rope["partial_rotary_factor"], where + "partial_rotary_factor")
    elif cfg.get("partial_rotary_factor") is not None:
        factor = read_float(cfg["partial_rotary_factor"], "partial_rotary_factor")
    else:
        factor = 1.0
    if not 0.0 <= factor <= 1.0:
        raise _bad("partial_rotary_factor", "must be in [0, 1]", factor)
    out["rotary_dim"] = int(round(factor * out["head_dim"]))


# ---------------------------------------------------------------------- writing
def fields_to_hf(fields: dict[str, Any], dialect: str) -> dict[str, Any]:
    """The config.json dict for ModelConfig field values `fields` (`ModelConfig.to_dict()`)."""
    if dialect not in ("legacy", "hf"):
        raise ValueError(f"dialect must be 'legacy' or 'hf', got {dialect!r}")
    f = fields
    out: dict[str, Any] = {k: f[k] for k in _COMMON}
    out.update(hidden_act="silu", attention_dropout=0.0, output_router_logits=False,
               router_jitter_noise=0.0, sliding_window=None, use_cache=True)
    layer_types = list(f["layer_types"])
    own_window = None  # the window in our own block: only for layouts transformers cannot say
    if SLIDING in layer_types:
        if dialect == "legacy":
            raise ValueError("the 'legacy' dialect (official MiniMaxText01) cannot express "
                             "sliding_attention layers; use dialect='hf'")
        if FULL not in layer_types:
            # exactly what transformers' MiniMax computes: its sliding_window covers every
            # softmax layer
            layer_types = [FULL if t == SLIDING else t for t in layer_types]
            out["sliding_window"] = f["sliding_window"]
        else:  # full and sliding layers mixed: ours alone; transformers refuses the layer type
            own_window = f["sliding_window"]
    if dialect == "legacy":
        out.update(architectures=["MiniMaxText01ForCausalLM"], model_type=LEGACY_MODEL_TYPE,
                   attn_type_list=[0 if t == LINEAR else 1 for t in f["layer_types"]],
                   postnorm=f["postnorm"], rope_theta=f["rope_theta"],
                   rotary_dim=f["rotary_dim"], shared_intermediate_size=0,
                   block_size=f["block_size"], torch_dtype=f["dtype"])
        for ours, theirs in _LEGACY_RESIDUAL.items():
            out[theirs] = f[ours]
    else:
        if not f["postnorm"]:
            raise ValueError("the 'hf' dialect (transformers' MiniMax) cannot express postnorm=False; "
                             "use dialect='legacy'")
        out.update(architectures=["MiniMaxForCausalLM"], model_type=HF_MODEL_TYPE,
                   layer_types=layer_types, block_size=f["block_size"],
                   rope_parameters={"rope_type": "default", "rope_theta": f["rope_theta"],
                                    "partial_rotary_factor": f["rotary_dim"] / f["head_dim"]},
                   dtype=f["dtype"])
        for ours, theirs in _HF_RESIDUAL.items():
            out[theirs] = f[ours]
    out["minimax01"] = {k: f[k] for k in OWN_FIELDS if k != "sliding_window"}
    if own_window is not None:
        out["minimax01"]["sliding_window"] = own_window
    return out


def preferred_dialect(config: Any) -> str:
    """The dialect to write when none is asked for: legacy (the official layout), or hf where
    legacy cannot express the model (sliding-window layers). `config`: a ModelConfig or its
    field dict."""
    types = config["layer_types"] if isinstance(config, dict) else config.layer_types
    return "hf" if SLIDING in types else "legacy"
