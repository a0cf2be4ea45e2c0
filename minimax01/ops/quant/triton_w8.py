"""Triton grouped matmul over 8-bit weights that dequantises on the fly (W8A16).

    y[rows of group e] = (x[rows of e] @ q[e]^T) * scale[e]      x: 16/32-bit, q: int8 or fp8

One launch covers every group (expert); row boundaries come from a device tensor `offs`
([E + 1] int32, offs[0] = 0), so nothing syncs with the host and a decode step can be captured in a
CUDA graph. Program (s, n, e) owns output columns [n*BLOCK_N, (n+1)*BLOCK_N) of group e and walks
that group's row blocks s, s + S, s + 2S, ... (S = programs on axis 0); groups without rows exit at
once. The weight tile is the left operand of the dot (the output is built transposed, [N, M]):
8-bit values are widened to the activation dtype in registers, exactly (int8, and fp8 e4m3 through
its fp16 bit pattern, fit bf16 exactly), the per-output-channel scale multiplies the fp32
accumulator once at the end. The split axis varies fastest, so the programs that share a weight tile
run together and the weights stream from memory once per launch.

`dense=True` is the one-group case (an nn.Linear): rows [0, M), no offsets tensor."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..triton_jit import interpreted, kernel


@kernel
def grouped_w8_kernel(
    X, W, S, Y, OFFS,
    M, N, K, sx_m, sw_e, sw_n, ss_e, sy_m,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    FP8: tl.constexpr, DENSE: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
):
    split = tl.program_id(0)
    nsplit = tl.num_programs(0)
    pid_n = tl.program_id(1)
    e = tl.program_id(2)
    if DENSE:
        start = 0
        end = M
    else:
        start = tl.load(OFFS + e)
        end = tl.load(OFFS + e + 1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = rn < N
    rk = tl.arange(0, BLOCK_K)
    scale = tl.load(S + e * ss_e + rn, mask=mn, other=0.0).to(tl.float32)
    if FP8:  # e4m3 bits placed in an fp16 pattern are the value times 2^-8 (normals and subnormals)
        scale = scale * 256.0
    w_rows = W + e.to(tl.int64) * sw_e + rn[:, None].to(tl.int64) * sw_n
    for m0 in range(start + split * BLOCK_M, end, nsplit * BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        mm = rm < end
        x_cols = X + rm[None, :].to(tl.int64) * sx_m
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            if EVEN_K:
                w = tl.load(w_rows + kk[None, :], mask=mn[:, None], other=0)
                xt = tl.load(x_cols + kk[:, None], mask=mm[None, :], other=0.0)
            else:
                mk = kk < K
                w = tl.load(w_rows + kk[None, :], mask=mn[:, None] & mk[None, :], other=0)
                xt = tl.load(x_cols + kk[:, None], mask=mk[:, None] & mm[None, :], other=0.0)
            if FP8:  # W holds the e4m3 bytes as uint8
                b = w.to(tl.int32)
                bits = ((b & 0x80) << 8) | ((b & 0x7F) << 7)
                wv = bits.to(tl.int16).to(tl.float16, bitcast=True).to(xt.dtype)
            else:
                wv = w.to(tl.float32).to(xt.dtype)  # via fp32: exact, and right in the interpreter
            if IEEE:  # fp32 activations; also bf16 in the interpreter, whose bf16 dot is wrong
                acc = tl.dot(wv.to(tl.float32), xt.to(tl.float32), acc=acc, input_precision="ieee")
            else:
                acc = tl.dot(wv, xt, acc=acc)
        y = acc * scale[:, None]
        tl.store(Y + rm[None, :].to(tl.int64) * sy_m + rn[:, None], y.to(Y.dtype.element_ty),
                 mask=mn[:, None] & mm[None, :])


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_N is the MMA's M (weight rows)
# decode: few rows, so many narrow weight-row blocks keep every SM streaming (N = 6144 outputs
# over 2 experts is only 192 programs at BLOCK_N = 64)
_DECODE = [(16, 64, 128, 4, 4), (16, 64, 256, 4, 3), (16, 128, 128, 4, 4), (16, 32, 256, 4, 4),
           (16, 16, 256, 2, 4), (16, 32, 512, 4, 3), (16, 128, 256, 8, 3)]
_MEDIUM = [(32, 64, 128, 4, 4), (32, 128, 128, 4, 3), (64, 128, 64, 4, 4), (64, 64, 128, 4, 3)]
_PREFILL = [(64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3), (128, 128, 64, 4, 4),
            (128, 256, 64, 8, 3)]
_INTERPRETED = (16, 32, 32, 4, 1)
_best: dict[tuple, tuple] = {}


def _bucket(rows: int) -> int:
    return min(256, triton.next_power_of_2(max(rows, 1)))


def _candidates(bucket: int) -> list[tuple]:
    return _DECODE if bucket <= 16 else _MEDIUM if bucket <= 64 else _PREFILL


def _launch(cfg, x, q, scale, y, offs, m, groups, rows_per_group, dense):
    bm, bn, bk, warps, stages = cfg
    n, k = q.shape[-2], q.shape[-1]
    fp8 = q.dtype != torch.int8
    w = q.view(torch.uint8) if fp8 else q
    nsplit = max(1, min(64, triton.cdiv(rows_per_group, bm)))
    grid = (nsplit, triton.cdiv(n, bn), groups)
    extra = {} if interpreted(x.device) else {"num_warps": warps, "num_stages": stages}
    grouped_w8_kernel.at(x.device)[grid](
        x, w, scale, y, offs if offs is not None else scale,
        m, n, k, x.stride(0), q.stride(0) if q.dim() == 3 else 0, q.stride(-2),
        scale.stride(0) if scale.dim() == 2 else 0, y.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, FP8=fp8, DENSE=dense, EVEN_K=k % bk == 0,
        IEEE=x.dtype == torch.float32 or interpreted(x.device), **extra)


def _tune(key, args) -> tuple:
    """Time every candidate once per (shape, rows bucket, dtypes) and keep the fastest. Skipped
    (heuristic first candidate) while a CUDA graph is being captured or with
    MINIMAX01_QUANT_AUTOTUNE=0."""
    if key in _best:
        return _best[key]
    cands = _candidates(key[0])
    if os.environ.get("MINIMAX01_QUANT_AUTOTUNE", "1") == "0" or torch.cuda.is_current_stream_capturing():
        return cands[0]
    times = []
    for cfg in cands:
        try:
            _launch(cfg, *args)  # compile + warm
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(3):
                _launch(cfg, *args)
            stop.record()
            stop.synchronize()
            times.append((start.elapsed_time(stop), cfg))
        except Exception:  # a config the compiler rejects (shared memory): skip it  # noqa: BLE001
            continue
    if not times:
        raise RuntimeError("no Triton config of the 8-bit grouped matmul compiled")
    _best[key] = min(times)[1]
    return _best[key]


def grouped_w8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offs: torch.Tensor | None,
               out_dtype: torch.dtype | None = None, config: tuple | None = None) -> torch.Tensor:
    """x [M, K] (rows grouped by expert, last dim contiguous); q [E, N, K] int8 or float8_e4m3fn
    (or [N, K] with offs=None: one dense group); scale [E, N] (or [N]) fp32; offs [E + 1] int32
    row offsets on x's device (offs[0] = 0, offs[E] = M). Returns [M, N] in out_dtype (x's)."""
    m, k = x.shape
    dense = offs is None
    if dense != (q.dim() == 2):
        raise ValueError("grouped_w8: pass offs for a stacked [E, N, K] weight, None for [N, K]")
    if q.shape[-1] != k or q.stride(-1) != 1:
        raise ValueError(f"grouped_w8: weight {list(q.shape)} does not take rows of width {k} "
                         f"(or its last dim is not contiguous)")
    if x.stride(-1) != 1:
        x = x.contiguous()
    groups = 1 if dense else q.shape[0]
    n = q.shape[-2]
    y = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    if m == 0:
        return y
    scale = scale.float().contiguous()
    rows = m if dense else triton.cdiv(m, min(groups, m))  # balanced-routing estimate, no sync
    if offs is not None:
        offs = offs.to(device=x.device, dtype=torch.int32).contiguous()
    args = (x, q, scale, y, offs, m, groups, rows, dense)
    if config is None:
        if interpreted(x.device):
            config = _INTERPRETED
        else:
            key = (_bucket(rows), n, k, groups, x.dtype, q.dtype)
            config = _tune(key, args)
    _launch(config, *args)
    return y
