"""Weight-only 8-bit formats with one fp32 scale per output channel (a row of an nn.Linear-layout
weight [..., N, K]): `w ~ q * scale[..., None]`.

    int8: symmetric round-to-nearest, q in [-127, 127], scale = max|row| / 127
    fp8:  float8 e4m3 (torch.float8_e4m3fn, finite max 448), scale = max|row| / 448

A row's scale depends on that row alone, so quantising any block of whole rows (one expert, the
w1 or w3 half of gate_up, a tensor-parallel row shard) gives exactly the bytes of quantising the
whole tensor: loaders quantise piece by piece and never hold the 16-bit tensor entire. Zero rows
get scale 1 and q = 0 (dequantise to exact zeros). Error per element, provable and tested:
int8 |w - q*s| <= s/2; fp8 |w - q*s| <= 2^-4 |w| (normal range) or 2^-10 s (subnormals)."""

from __future__ import annotations

import torch

FORMATS = ("int8", "fp8")
INT8_MAX = 127.0
FP8_MAX = 448.0


def fp8_dtype() -> torch.dtype:
    """torch.float8_e4m3fn, or a clear error on a torch without float8 types."""
    dt = getattr(torch, "float8_e4m3fn", None)
    if dt is None:
        raise ValueError(f"fp8 quantisation needs torch.float8_e4m3fn (torch >= 2.1); this torch "
                         f"{torch.__version__} has none: use --quantization int8")
    return dt


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"quantization must be one of {', '.join(FORMATS)} or none, got {fmt!r}")
    return fmt


def storage_dtype(fmt: str) -> torch.dtype:
    return torch.int8 if check_format(fmt) == "int8" else fp8_dtype()


def format_of(dtype: torch.dtype) -> str:
    if dtype == torch.int8:
        return "int8"
    if dtype == getattr(torch, "float8_e4m3fn", None):
        return "fp8"
    raise ValueError(f"{dtype} is not a quantised weight dtype (int8 or float8_e4m3fn)")


def quantize(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] (any float dtype, any device) -> (q [..., N, K] int8 | float8_e4m3fn,
    scale [..., N] fp32). Computed in fp32 on w's device."""
    check_format(fmt)
    if w.dim() < 2:
        raise ValueError(f"quantize: expected a weight of at least 2 dims, got shape {list(w.shape)}")
    wf = w.float()
    amax = wf.abs().amax(dim=-1)
    top = INT8_MAX if fmt == "int8" else FP8_MAX
    scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))
    x = wf / scale[..., None]
    del wf
    if fmt == "int8":
        q = x.round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    else:
        q = x.clamp_(-FP8_MAX, FP8_MAX).to(fp8_dtype())
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q * scale[..., None] in `dtype` (the product is formed in fp32, rounded once)."""
    return (q.float() * scale.float()[..., None]).to(dtype)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row fp8 activations for the fp8 tensor-core path: x [M, K] -> (xq [M, K]
    e4m3, scale [M] fp32) with x ~ xq * scale[:, None]."""
    return quantize(x, "fp8")
