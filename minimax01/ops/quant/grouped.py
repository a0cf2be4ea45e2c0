"""Matmuls over 8-bit weights with per-output-channel scales: the grouped form (MoE experts) and
the dense form (nn.Linear), each with a plain-PyTorch twin.

    grouped_mm_q(x, q, scale, counts)   x [M, K] grouped by expert (counts [E]), q [E, N, K]
    linear_q(x, q, scale)               x [..., K], q [N, K]

Backends (same function, tested against each other):
    "torch"   the twin: per group (x @ q^T) * scale in fp32, rounded once to x's dtype
    "triton"  dequantise-on-the-fly kernel (triton_w8.py): CUDA, or the CPU under TRITON_INTERPRET=1
    "scaled"  fp8 only, Hopper tensor cores: activations quantised per row to e4m3 on the fly,
              then torch._scaled_grouped_mm / torch._scaled_mm with row x column scales (W8A8; a
              little more error than W8A16, twice the bf16 matmul rate). Its twin: scaled_twin.
backend=None picks "torch" on the CPU; on CUDA "triton", or for fp8 weights with many rows per
group (prefill) "scaled" where torch has it and the GPU is sm90+."""

from __future__ import annotations

import logging
import os

import torch

from .schemes import dequantize, quantize_rows_fp8

log = logging.getLogger(__name__)

BACKENDS = ("torch", "triton", "scaled")
SCALED_MIN_ROWS = 128  # rows per group from which the fp8 tensor-core path pays (prefill)
scaled_error: str | None = None  # why the "scaled" path failed once (then the default avoids it)


# ---------------------------------------------------------------------------- twins
def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def grouped_mm_q_torch(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                       counts: torch.Tensor) -> torch.Tensor:
    """The reference: rows of group e times q[e]^T, in fp32 (fp64 stays fp64), times scale[e];
    cast to x.dtype."""
    acc = _acc_dtype(x)
    outs = []
    for e, xe in enumerate(torch.split(x, [int(c) for c in counts.tolist()])):
        if xe.shape[0]:
            outs.append(((xe.to(acc) @ q[e].to(acc).t()) * scale[e].to(acc)).to(x.dtype))
    return torch.cat(outs, 0) if outs else x.new_zeros(0, q.shape[-2])


def scaled_twin(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                counts: torch.Tensor | None) -> torch.Tensor:
    """What the "scaled" backend computes, in plain PyTorch: x quantised per row to e4m3, both
    operands dequantised, fp32 matmul."""
    xq, sx = quantize_rows_fp8(x)
    xd = dequantize(xq, sx)
    if counts is None:
        return (xd @ dequantize(q, scale).t()).to(x.dtype)
    outs = []
    for e, xe in enumerate(torch.split(xd, [int(c) for c in counts.tolist()])):
        if xe.shape[0]:
            outs.append((xe @ dequantize(q[e], scale[e]).t()).to(x.dtype))
    return torch.cat(outs, 0) if outs else x.new_zeros(0, q.shape[-2])


# ---------------------------------------------------------------------------- backends
def scaled_available(device: torch.device) -> bool:
    """fp8 tensor cores: CUDA sm90+ and a torch with _scaled_grouped_mm."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_grouped_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


def _offsets(counts: torch.Tensor, device) -> torch.Tensor:
    """[E + 1] int32 row offsets on `device`, computed where `counts` lives (no host sync)."""
    offs = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=counts.device)
    offs[1:] = torch.cumsum(counts, 0)
    return offs.to(device)


def _scaled_grouped(x, q, scale, counts):
    xq, sx = quantize_rows_fp8(x)
    ends = torch.cumsum(counts.to(x.device), 0, dtype=torch.int32)
    return torch._scaled_grouped_mm(xq, q.transpose(-2, -1), sx, scale.float(), offs=ends,
                                    out_dtype=x.dtype)


def _scaled_dense(x, q, scale):
    xq, sx = quantize_rows_fp8(x)
    return torch._scaled_mm(xq, q.t(), scale_a=sx[:, None], scale_b=scale.float()[None, :],
                            out_dtype=x.dtype)


def _scaled_failed(e: Exception) -> None:
    """The fp8 tensor-core path raised (a torch build or shape it does not take): say so once
    and use the dequantising kernel from now on."""
    global scaled_error
    scaled_error = f"{type(e).__name__}: {e}"
    log.warning("fp8 torch._scaled_grouped_mm/_scaled_mm failed (%s); using the Triton "
                "dequantising kernel instead", scaled_error)


def _pick(x: torch.Tensor, q: torch.Tensor, rows_per_group: int, backend: str | None) -> str:
    if backend is None:
        backend = os.environ.get("MINIMAX01_QUANT_BACKEND") or None
    if backend is None:
        if not x.is_cuda:
            return "torch"
        fp8 = q.dtype != torch.int8
        if fp8 and rows_per_group >= SCALED_MIN_ROWS and x.dtype == torch.bfloat16 \
                and scaled_error is None and scaled_available(x.device):
            return "scaled"
        return "triton"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "scaled" and q.dtype == torch.int8:
        raise ValueError("the 'scaled' backend is for fp8 weights; int8 uses 'triton' or 'torch'")
    return backend


def grouped_mm_q(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, counts: torch.Tensor,
                 backend: str | None = None) -> torch.Tensor:
    """x [M, K] rows grouped by expert (counts [E], any integer dtype, on any device); q [E, N, K]
    int8 or float8_e4m3fn; scale [E, N] fp32. Returns [M, N] in x.dtype."""
    if x.shape[0] == 0:
        return x.new_zeros(0, q.shape[-2])
    e = q.shape[0]
    rows = -(-x.shape[0] // min(e, x.shape[0]))
    kind = _pick(x, q, rows, backend)
    if kind == "torch":
        return grouped_mm_q_torch(x, q, scale, counts)
    if kind == "scaled":
        try:
            return _scaled_grouped(x, q, scale, counts)
        except RuntimeError as e:
            if backend == "scaled":
                raise
            _scaled_failed(e)
    from .triton_w8 import grouped_w8

    return grouped_w8(x, q, scale, _offsets(counts, x.device))


def linear_q(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
             backend: str | None = None) -> torch.Tensor:
    """x [..., K] @ (q * scale)^T with q [N, K] int8 or float8_e4m3fn, scale [N] fp32."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    kind = _pick(flat, q, flat.shape[0], backend)
    if flat.shape[0] == 0:
        y = flat.new_zeros(0, q.shape[0])
    elif kind == "torch":
        acc = _acc_dtype(flat)
        y = ((flat.to(acc) @ q.to(acc).t()) * scale.to(acc)).to(x.dtype)
    elif kind == "scaled":
        try:
            y = _scaled_dense(flat, q, scale)
        except RuntimeError as e:
            if backend == "scaled":
                raise
            _scaled_failed(e)
            from .triton_w8 import grouped_w8

            y = grouped_w8(flat, q, scale, None)
    else:
        from .triton_w8 import grouped_w8

        y = grouped_w8(flat, q, scale, None)
    return y.reshape(*shape[:-1], q.shape[0])
