"""Matmuls over 8-bit weights with per-output-channel scales: the grouped form (MoE experts) and
the dense form (nn.Linear), each with a plain-PyTorch twin.

    grouped_mm_q(x, q, scale, counts)   x [M, K] grouped by expert (counts [E]), q [E, N, K]
    linear_q(x, q, scale)               x [..., K], q [N, K]

Backends (same function, tested against each other):
    "torch"   the twin: per group (x @ q^T) * scale in fp32, rounded once to x's dtype
    "triton"  dequantise-on-the-fly kernel (triton_w8.py): CUDA, or the CPU under TRITON_INTERPRET=1;
              up to GEMV_MAX_ROWS (8) rows per group its tiles are the GEMV kernel's (triton_gemv_w8.py)
    "scaled"  fp8 only, Hopper tensor cores: activations quantised per row to e4m3 on the fly,
              then torch._scaled_grouped_mm / torch._scaled_mm with row x column scales (W8A8; a
              little more error than W8A16, twice the bf16 matmul rate). Its twin: scaled_twin.
    "dequant" prefill: the 8-bit weights dequantised (q * scale, fp32, rounded once to x's dtype)
              into a reusable 16-bit workspace, then the 16-bit grouped matmul (torch._grouped_mm,
              the bf16 tensor-core rate) or F.linear; chunked over experts (or output rows) so
              the workspace stays under DEQUANT_WORKSPACE_BYTES. Extra cost: 3 bytes per weight
              (read 1, write 2) at memory bandwidth, ~0.7 ms per GB of 8-bit weights on an H200.
backend=None picks "torch" on the CPU; on CUDA (`auto_backend`, bf16 activations): fp8 weights
with at least SCALED_MIN_ROWS rows per group "scaled" where torch has it and the GPU is sm90+;
else at least DEQUANT_MIN_ROWS rows per group (prefill) "dequant"; fewer (decode) "triton", as
always while a CUDA graph is being captured."""

from __future__ import annotations

import logging
import os

import torch

from ..moe import grouped_mm
from .schemes import dequantize, quantize_rows_fp8
from .twin import _acc_dtype, grouped_mm_q_torch

log = logging.getLogger(__name__)

BACKENDS = ("torch", "triton", "scaled", "dequant")
SCALED_MIN_ROWS = 128  # rows per group from which the fp8 tensor-core path pays (prefill)
# Rows per group (per weight matrix) from which dequantise + 16-bit matmul beats the W8A16 kernel.
# Rule: both compute-bound, the dequant path pays 3 bytes per weight at bandwidth BW and wins when
# 2r / R8 > 3 / BW + 2r / R16, i.e. r > 1.5 / (BW (1/R8 - 1/R16)). H200 (2026-12-02): BW 4.3 TB/s,
# W8A16 kernel R8 = 341 TFLOP/s, torch._grouped_mm bf16 R16 = 530 TFLOP/s -> r = 334.
# `benchmarks/quant_slice.py --sweep` measures the crossover directly and prints it: on the H200
# (2026-12-02, Text-01's w13/w2) the kernel still wins at 256 rows and loses at 512.
DEQUANT_MIN_ROWS = 512
DEQUANT_WORKSPACE_BYTES = 1 << 30  # the reusable 16-bit workspace of the "dequant" path, at most
_workspace: dict = {}              # (device, dtype) -> flat tensor, grown on demand
scaled_error: str | None = None  # why the "scaled" path failed once (then the default avoids it)


# ---------------------------------------------------------------------------- twins
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


def auto_backend(fp8: bool, rows_per_group: int, dtype: torch.dtype, scaled_ok: bool) -> str:
    """backend=None on CUDA outside a graph capture: fp8 tensor cores or dequantise + 16-bit
    matmul for prefill-sized groups, the W8A16 kernel for decode-sized ones."""
    if fp8 and scaled_ok and rows_per_group >= SCALED_MIN_ROWS and dtype == torch.bfloat16:
        return "scaled"
    if rows_per_group >= DEQUANT_MIN_ROWS and dtype == torch.bfloat16:
        return "dequant"
    return "triton"


def _pick(x: torch.Tensor, q: torch.Tensor, rows_per_group: int, backend: str | None) -> str:
    if backend is None:
        backend = os.environ.get("MINIMAX01_QUANT_BACKEND") or None
    if backend is None:
        if not x.is_cuda:
            return "torch"
        if torch.cuda.is_current_stream_capturing():
            return "triton"
        fp8 = q.dtype != torch.int8
        scaled_ok = fp8 and scaled_error is None and scaled_available(x.device)
        return auto_backend(fp8, rows_per_group, x.dtype, scaled_ok)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "scaled" and q.dtype == torch.int8:
        raise ValueError("the 'scaled' backend is for fp8 weights; int8 uses 'triton' or 'torch'")
    return backend


# ---------------------------------------------------------------------------- dequant path
def workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable flat buffer of at least `numel` elements (one per device and dtype; calls on
    one stream reuse it in order)."""
    key = (str(device), dtype)
    buf = _workspace.get(key)
    if buf is None or buf.numel() < numel:
        _workspace.pop(key, None)
        buf = _workspace[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def _dequant_into(q: torch.Tensor, scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """q * scale in x's dtype, written into the workspace (the Triton kernel on CUDA); into a
    fresh tensor when autograd may keep it for x's backward."""
    dtype = x.dtype
    if torch.is_grad_enabled() and x.requires_grad:
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
    else:
        out = workspace(q.numel(), dtype, q.device).view(q.shape)
    if q.is_cuda:
        from .triton_w8 import dequantize_w8

        return dequantize_w8(q.contiguous(), scale, out)
    return out.copy_(dequantize(q, scale, dtype))


def _per_chunk(shape: tuple, dtype: torch.dtype, limit: int | None) -> int:
    """How many leading entries of a weight of `shape` fit the workspace (at least one)."""
    one = dtype.itemsize
    for d in shape[1:]:
        one *= d
    return max(1, (DEQUANT_WORKSPACE_BYTES if limit is None else limit) // max(one, 1))


def dequant_grouped(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, counts: torch.Tensor,
                    workspace_bytes: int | None = None) -> torch.Tensor:
    """The "dequant" backend of grouped_mm_q: experts dequantised a chunk at a time, each chunk's
    rows through the 16-bit grouped matmul (torch._grouped_mm for bf16 on CUDA, else a loop).
    All experts in one chunk: no host sync; several chunks: one (the counts, to slice x)."""
    e, n, _ = q.shape
    dtype = x.dtype
    impl = "grouped" if x.is_cuda and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm") \
        else "loop"
    chunk = _per_chunk(tuple(q.shape), dtype, workspace_bytes)
    if chunk >= e:
        return grouped_mm(x, _dequant_into(q, scale, x), counts, impl)
    host = [int(c) for c in counts.tolist()]
    out = x.new_empty(x.shape[0], n)
    r0 = 0
    for e0 in range(0, e, chunk):
        e1 = min(e, e0 + chunk)
        rows = sum(host[e0:e1])
        if rows:
            w = _dequant_into(q[e0:e1], scale[e0:e1], x)
            out[r0:r0 + rows] = grouped_mm(x[r0:r0 + rows], w, counts[e0:e1], impl)
        r0 += rows
    return out


def dequant_dense(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                  workspace_bytes: int | None = None) -> torch.Tensor:
    """The "dequant" backend of linear_q: x [M, K] @ (q * scale)^T through the 16-bit matmul,
    the weight dequantised a block of output rows at a time."""
    chunk = _per_chunk(tuple(q.shape), x.dtype, workspace_bytes)
    outs = [x @ _dequant_into(q[n0:n0 + chunk], scale[n0:n0 + chunk], x).t()
            for n0 in range(0, q.shape[0], chunk)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, -1)


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
    if kind == "dequant":
        return dequant_grouped(x, q, scale, counts)
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
    elif kind == "dequant":
        y = dequant_dense(flat, q, scale)
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
