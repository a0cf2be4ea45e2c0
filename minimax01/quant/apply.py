"""Swapping 8-bit modules into a built model from outside: `quantize_model(model, "int8"|"fp8")`.

What gets quantised (`modules`): "experts" (every MoE expert matrix, 90% of Text-01's weights) and
"attention" (the lightning qkv_proj / output_gate / out_proj and the softmax q/k/v/o_proj). The
router, the embeddings, lm_head and every norm stay 16-bit (the paper's W8A16 recipe). The model's
own code is untouched: it calls `self.experts(x, counts)` and `self.qkv_proj(x)` as before.

The rule for names: a quantised tensor keeps its name and dtype int8 | float8_e4m3fn; its fp32
per-output-channel scales are the tensor "<name>_scale" (shape: the tensor's without the last dim).
`QuantConfig` is what config.json's `quantization_config` holds (docs/quantization.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import FULL, LINEAR, SLIDING, ModelConfig
from ..ops.quant.schemes import FORMATS, check_format, fp8_dtype, storage_dtype
from .modules import QuantizedExperts, QuantizedLinear, module_format

MODULE_GROUPS = ("experts", "attention")
DEFAULT_MODULES = MODULE_GROUPS
_SOFTMAX_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
ATTENTION_LINEARS = {LINEAR: ("qkv_proj", "output_gate", "out_proj"), FULL: _SOFTMAX_LINEARS,
                     SLIDING: _SOFTMAX_LINEARS}
QUANT_METHOD = "minimax01"
SCALE_SUFFIX = "_scale"


@dataclass(frozen=True)
class QuantConfig:
    format: str                                  # "int8" | "fp8"
    modules: tuple[str, ...] = DEFAULT_MODULES   # subset of MODULE_GROUPS

    def __post_init__(self):
        check_format(self.format)
        bad = [m for m in self.modules if m not in MODULE_GROUPS]
        if bad or not self.modules:
            raise ValueError(f"quantization modules must be a non-empty subset of "
                             f"{MODULE_GROUPS}, got {list(self.modules)}")
        object.__setattr__(self, "modules", tuple(m for m in MODULE_GROUPS if m in self.modules))

    def to_json(self) -> dict:
        return {"quant_method": QUANT_METHOD, "format": self.format,
                "weight_dtype": str(storage_dtype(self.format)).replace("torch.", ""),
                "scale_dtype": "float32", "granularity": "per_output_channel",
                "scale_suffix": SCALE_SUFFIX, "modules": list(self.modules)}

    @classmethod
    def from_json(cls, data) -> "QuantConfig":
        """Read config.json's `quantization_config`; errors name the offending field."""
        if not isinstance(data, dict):
            raise ValueError("config.json: quantization_config must be an object")
        method = data.get("quant_method")
        if method != QUANT_METHOD:
            raise ValueError(f"config.json: quantization_config.quant_method {method!r} is not "
                             f"supported (minimax01 reads {QUANT_METHOD!r} checkpoints only)")
        fmt = data.get("format")
        if fmt not in FORMATS:
            raise ValueError(f"config.json: quantization_config.format must be one of {FORMATS}, "
                             f"got {fmt!r}")
        modules = data.get("modules", list(DEFAULT_MODULES))
        if not isinstance(modules, list) or any(m not in MODULE_GROUPS for m in modules):
            raise ValueError(f"config.json: quantization_config.modules must list some of "
                             f"{MODULE_GROUPS}, got {modules!r}")
        return cls(fmt, tuple(modules))


def resolve(quantization, modules=None) -> QuantConfig | None:
    """None / "none" -> None; "int8" / "fp8" / a QuantConfig -> a QuantConfig."""
    if quantization is None or quantization == "none":
        return None
    if isinstance(quantization, QuantConfig):
        return quantization
    if quantization not in FORMATS:
        raise ValueError(f"quantization must be one of int8, fp8 or none, got {quantization!r}")
    return QuantConfig(quantization, tuple(modules) if modules else DEFAULT_MODULES)


def check_supported(fmt: str, device: torch.device | str) -> None:
    """Raise one clear ValueError when `fmt` cannot run on `device`."""
    device = torch.device(device)
    if fmt != "fp8":
        return
    dt = fp8_dtype()
    try:  # the CPU twin needs float8 conversions on this build / CPU
        torch.ones(2, device=device).to(dt).float()
    except Exception as e:  # noqa: BLE001 - any failure means: not supported here
        raise ValueError(f"fp8 weights are not supported on {device} with torch "
                         f"{torch.__version__} ({type(e).__name__}: {e}); use --quantization "
                         f"int8") from None


def quantized_tensors(config: ModelConfig, qc: QuantConfig) -> list[str]:
    """Names of the model tensors `qc` stores in 8 bits (each has a "<name>_scale" beside it)."""
    names = []
    for i, kind in enumerate(config.layer_types):
        if "attention" in qc.modules:
            names += [f"model.layers.{i}.self_attn.{p}.weight" for p in ATTENTION_LINEARS[kind]]
        if "experts" in qc.modules:
            names += [f"model.layers.{i}.mlp.experts.gate_up_proj",
                      f"model.layers.{i}.mlp.experts.down_proj"]
    return names


def _swap(model: nn.Module, qc: QuantConfig, make_experts, make_linear) -> nn.Module:
    for layer in model.model.layers:
        if "experts" in qc.modules and not isinstance(layer.mlp.experts, QuantizedExperts):
            layer.mlp.experts = make_experts(layer.mlp.experts)
        if "attention" in qc.modules:
            attn = layer.self_attn
            for name in ATTENTION_LINEARS[layer.layer_type]:
                lin = getattr(attn, name)
                if not isinstance(lin, QuantizedLinear):
                    setattr(attn, name, make_linear(lin))
    return model


@torch.no_grad()
def quantize_model(model: nn.Module, quantization="int8", modules=None) -> nn.Module:
    """Quantise `model`'s experts (and attention projections) in place, on the device they are
    on (a GPU quantises Text-01 in seconds); returns the model. "none"/None changes nothing."""
    qc = resolve(quantization, modules)
    if qc is None:
        return model
    device = next(model.parameters()).device
    check_supported(qc.format, device)
    _swap(model, qc, lambda ex: QuantizedExperts.from_experts(ex, qc.format),
          lambda lin: QuantizedLinear.from_linear(lin, qc.format))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model


def quantize_on_meta(model: nn.Module, qc: QuantConfig) -> nn.Module:
    """Swap in empty 8-bit modules on the meta device (loaders fill them with assign=True)."""
    cfg = model.config
    return _swap(
        model, qc,
        lambda ex: QuantizedExperts(cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size,
                                    qc.format, device="meta"),
        lambda lin: QuantizedLinear(lin.in_features, lin.out_features, qc.format, device="meta"))


def quantization_of(model: nn.Module) -> QuantConfig | None:
    """The QuantConfig a model's modules carry, None for a 16-bit model."""
    fmts, groups = set(), set()
    for layer in model.model.layers:
        f = module_format(layer.mlp.experts)
        if f:
            fmts.add(f)
            groups.add("experts")
        for name in ATTENTION_LINEARS[layer.layer_type]:
            f = module_format(getattr(layer.self_attn, name))
            if f:
                fmts.add(f)
                groups.add("attention")
    if not fmts:
        return None
    if len(fmts) > 1:
        raise ValueError(f"model mixes quantisation formats {sorted(fmts)}")
    return QuantConfig(fmts.pop(), tuple(groups))


def set_backend(model: nn.Module, backend: str | None) -> None:
    """Force every quantised module onto one ops.quant backend ("torch", "triton", "scaled")."""
    for m in model.modules():
        if isinstance(m, (QuantizedExperts, QuantizedLinear)):
            m.backend = backend
