"""Names and layout of 8-bit checkpoint tensors (docs/quantization.md): a quantised tensor keeps
its checkpoint name with dtype I8 or F8_E4M3, its fp32 per-output-channel scales are
"<name>_scale", and config.json's `quantization_config` says which format. Shared by the
pre-quantised reader/writer (quantized.py) and the per-rank sliced reader (sliced.py)."""

from __future__ import annotations

from ..quant import QuantConfig
from ..quant.apply import SCALE_SUFFIX
from .dialects import Piece, pieces

QUANT_CODES = {"int8": "I8", "fp8": "F8_E4M3"}
CONFIG_KEY = "quantization_config"


# ---------------------------------------------------------------------- names
def scale_name(name: str) -> str:
    return name + SCALE_SUFFIX


def quantized_pieces(param: str, shape: tuple[int, ...], dialect: str) -> list[Piece]:
    """The checkpoint pieces of a quantised model tensor and of its scales."""
    out = []
    for p in pieces(param, shape, dialect):
        out.append(p)
        out.append(Piece(scale_name(p.name), scale_name(param), p.index, p.shape[:-1]))
    return out


def checkpoint_layout(param_shapes: dict[str, tuple[int, ...]], qnames: set[str],
                      dialect: str) -> dict[str, Piece]:
    """Checkpoint name -> Piece for a model whose tensors `qnames` are quantised (their scale
    entries in `param_shapes` are covered by the weight's pieces)."""
    scales = {scale_name(n) for n in qnames}
    out: dict[str, Piece] = {}
    for param, shape in param_shapes.items():
        if param in scales:
            continue
        for p in (quantized_pieces if param in qnames else pieces)(param, shape, dialect):
            out[p.name] = p
    return out


def stored_quantization(config_dict: dict) -> QuantConfig | None:
    data = config_dict.get(CONFIG_KEY)
    return None if data is None else QuantConfig.from_json(data)
