"""The one map of dtype names for the whole package.

Model weights, autocast and exports use three floating-point dtypes, named as torch names them
("float32", "bfloat16", "float16"); users may also write the usual aliases ("fp32", "bf16",
"half", "torch.bfloat16", ...). safetensors headers use their own codes ("F32", "BF16", ...).
Everything that turns a name into a torch dtype, or back, goes through here. Importing this
module does not import torch (config.py uses the names; the torch side is imported on use)."""

from __future__ import annotations

from typing import Any

FLOAT_DTYPES = ("float32", "bfloat16", "float16")   # what weights, autocast and exports may use
_ALIASES = {"fp32": "float32", "float": "float32", "f32": "float32",
            "bf16": "bfloat16",
            "fp16": "float16", "half": "float16", "f16": "float16"}
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# safetensors dtype code -> torch dtype attribute name (every code safetensors writes)
SAFETENSORS_CODES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16",
                     "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
                     "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
                     "U8": "uint8", "BOOL": "bool"}
FLOAT_CODES = ("F64", "F32", "BF16", "F16")       # codes a model weight may be stored in


def canonical_name(value: Any, what: str = "dtype") -> str:
    """"float32", "bfloat16" or "float16" for a name, an alias or a torch dtype; a ValueError
    naming `what` for anything else (int8, float64, "", None, ...)."""
    name = None
    if isinstance(value, str):
        key = value.strip().lower()
        key = key[len("torch."):] if key.startswith("torch.") else key
        name = _ALIASES.get(key, key)
    elif type(value).__name__ == "dtype" and type(value).__module__ == "torch":
        name = str(value).replace("torch.", "")
    if name not in FLOAT_DTYPES:
        raise ValueError(f"{what} must be one of {', '.join(FLOAT_DTYPES)} (or bf16, fp16, fp32); "
                         f"got {value!r}")
    return name


def torch_dtype(value: Any, what: str = "dtype"):
    """The torch dtype for a name, an alias or a torch dtype (one of FLOAT_DTYPES)."""
    import torch

    return getattr(torch, canonical_name(value, what))


def resolve_dtype(value: Any, what: str = "dtype"):
    """None stays None (meaning "as stored" / "the default"); else `torch_dtype`."""
    return None if value is None else torch_dtype(value, what)


def dtype_name(dtype) -> str:
    """"bfloat16" for torch.bfloat16 (any torch dtype: its name without "torch.")."""
    return str(dtype).replace("torch.", "")


def from_safetensors_code(code: str):
    """The torch dtype of a safetensors code ("BF16" -> torch.bfloat16); None if this torch
    build lacks it (old float8 types)."""
    import torch

    attr = SAFETENSORS_CODES.get(code)
    return getattr(torch, attr, None) if attr else None


def name_of_code(code: str) -> str | None:
    """The FLOAT_DTYPES name of a safetensors code, or None ("F64", "I8", ...)."""
    name = SAFETENSORS_CODES.get(code)
    return name if name in FLOAT_DTYPES else None
