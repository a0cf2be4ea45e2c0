"""Triton grouped matmul over 8-bit weights that dequantises on the fly (W8A16), and the kernel
that dequantises 8-bit weights into a 16-bit workspace (the prefill path, grouped.py).

    y[rows of group e] = (x[rows of e] @ q[e]^T) * scale[e]      x: 16/32-bit, q: int8 or fp8

One launch covers every group (expert); row boundaries come from a device tensor `offs`
([E + 1] int32, offs[0] = 0), so nothing syncs with the host and a decode step can be captured in a
CUDA graph. Program (s, n, e) owns output columns [n*BLOCK_N, (n+1)*BLOCK_N) of group e and walks
that group's row blocks s, s + S, s + 2S, ... (S = row splits); groups without rows exit at once.
With fewer rows M than groups (decode at batch 1: 2 rows, 32 experts) only M programs are launched
on the group axis, program e taking the e-th group that has rows (found from `offs` on the device).
8-bit values are widened in registers, exactly (int8 through an fp32 magic number rather than
the slow int-to-float unit, fp8 e4m3 through its fp16 bit pattern; both fit bf16 exactly); the
per-output-channel scale multiplies the fp32 accumulator once at the end.
The row-split axis varies fastest, so the programs that share a weight tile run together and the
weights stream from memory once per launch.

A config is (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages):
  * BLOCK_M >= 16: tensor-core dot with the weight tile as its left operand (output built
    transposed, [N, M]); BLOCK_M < 16 (decode: 1-8 rows per expert or dense projection): the
    GEMV kernel of triton_gemv_w8.py (no dot, 128-bit weight loads, fp32 FMAs, one reduction);
  * SPLIT_K > 1: the program axis 0 also splits K (decode: at batch 1 the 2 touched experts
    of the down projection, N = 6144, give only 96-384 programs for 132 SMs, each walking
    K = 9216); each split writes its fp32 partial (scale applied) to a [SPLIT_K, M, N] workspace
    summed afterwards by one small kernel (deterministic, no atomics).

Which config: `SHIPPED` (per GPU, measured by `benchmarks/quant_slice.py --sweep`) for an exact
(format, N, K, groups, rows bucket) key; else the fastest of `candidates(rows per group)`, timed
once per key on a balanced routing of that many rows (never on the batch at hand: the CUDA-graph
warm-up batch routes every row to the same experts); MINIMAX01_QUANT_AUTOTUNE=0 or a CUDA-graph
capture takes the first candidate. `dense=True` is the one-group case (an nn.Linear)."""

from __future__ import annotations

import logging
import os

import torch
import triton
import triton.language as tl

from ..triton_jit import interpreted, kernel
from .triton_gemv_w8 import launch_gemv, sum_splits_kernel
from .twin import grouped_mm_q_torch

log = logging.getLogger(__name__)
TUNE_TOL = 2.0 ** -7  # relative error against the twin a tuning candidate must stay under


@kernel
def grouped_w8_kernel(
    X, W, S, Y, OFFS,
    M, N, K, G, K_SPLIT, sx_m, sw_e, sw_n, ss_e, sy_s, sy_m,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    FP8: tl.constexpr, DENSE: tl.constexpr, COMPACT: tl.constexpr, G_POW2: tl.constexpr,
    EVEN_K: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    nsplit = tl.num_programs(0) // SPLIT_K
    split = pid % nsplit
    ks = pid // nsplit
    pid_n = tl.program_id(1)
    e = tl.program_id(2)
    if DENSE:
        start = 0
        end = M
    elif COMPACT:  # fewer rows than groups: program e takes the e-th group that has rows
        r = tl.arange(0, G_POW2)
        lo = tl.load(OFFS + r, mask=r < G, other=0)
        hi = tl.load(OFFS + r + 1, mask=r < G, other=0)
        has = (hi > lo).to(tl.int32)
        hit = (has > 0) & (tl.cumsum(has, axis=0) == e + 1)
        found = tl.sum(hit.to(tl.int32), axis=0)
        e = tl.sum(tl.where(hit, r, 0), axis=0)
        start = tl.load(OFFS + e)
        end = tl.where(found > 0, tl.load(OFFS + e + 1), start)
    else:
        start = tl.load(OFFS + e)
        end = tl.load(OFFS + e + 1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = rn < N
    rk = tl.arange(0, BLOCK_K)
    k_lo = ks * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    scale = tl.load(S + e * ss_e + rn, mask=mn, other=0.0).to(tl.float32)
    if FP8:  # e4m3 bits placed in an fp16 pattern are the value times 2^-8 (normals and subnormals)
        scale = scale * 256.0
    w_rows = W + e.to(tl.int64) * sw_e + rn[:, None].to(tl.int64) * sw_n
    y_part = Y + ks.to(tl.int64) * sy_s
    for m0 in range(start + split * BLOCK_M, end, nsplit * BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        mm = rm < end
        x_cols = X + rm[None, :].to(tl.int64) * sx_m
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + rk
            if EVEN_K:
                w = tl.load(w_rows + kk[None, :], mask=mn[:, None], other=0)
                xt = tl.load(x_cols + kk[:, None], mask=mm[None, :], other=0.0)
            else:
                mk = kk < k_hi
                w = tl.load(w_rows + kk[None, :], mask=mn[:, None] & mk[None, :], other=0)
                xt = tl.load(x_cols + kk[:, None], mask=mk[:, None] & mm[None, :], other=0.0)
            if FP8:  # W holds the e4m3 bytes as uint8
                b = w.to(tl.int32)
                bits = ((b & 0x80) << 8) | ((b & 0x7F) << 7)
                wf = bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            else:  # exact, without the slow int-to-float unit (triton_gemv_w8.py's docstring)
                wf = (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
            if IEEE:  # fp32 activations; also bf16 in the interpreter, whose bf16 dot is wrong
                acc = tl.dot(wf, xt.to(tl.float32), acc=acc, input_precision="ieee")
            else:
                acc = tl.dot(wf.to(xt.dtype), xt, acc=acc)
        y = acc * scale[:, None]
        tl.store(y_part + rm[None, :].to(tl.int64) * sy_m + rn[:, None],
                 y.to(Y.dtype.element_ty), mask=mn[:, None] & mm[None, :])


@kernel
def dequant_w8_kernel(W, S, OUT, R, K, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                      FP8: tl.constexpr):
    """OUT[r, k] = W[r, k] * S[r], formed in fp32 and rounded once (schemes.dequantize)."""
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rr < R)[:, None] & (rk < K)[None, :]
    offs = rr[:, None].to(tl.int64) * K + rk[None, :]
    w = tl.load(W + offs, mask=mask, other=0)
    scale = tl.load(S + rr, mask=rr < R, other=0.0).to(tl.float32)
    if FP8:
        b = w.to(tl.int32)
        bits = ((b & 0x80) << 8) | ((b & 0x7F) << 7)
        wf = bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        scale = scale * 256.0
    else:
        wf = w.to(tl.float32)
    tl.store(OUT + offs, (wf * scale[:, None]).to(OUT.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------- configs
# (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages); BLOCK_M < 16: the GEMV kernel
# (triton_gemv_w8.py), else the tensor-core kernel above (BLOCK_N is the MMA's M, weight rows)
GEMV_MAX_ROWS = 8  # rows per group up to which the run-time shortlist is GEMV tiles first
# Why 8: the GEMV spends BLOCK_M fp32 FMAs (+1 add, ~2 integer ops to widen) per weight byte; an
# H200 SM issues 128 FMAs/clock and HBM feeds it ~16.5 int8 bytes/clock (4.3 TB/s over 132 SMs at
# 1.98 GHz), so up to ~6 rows a pass it stays memory-bound; past 8-16 rows tensor cores win.


def _gemv_space() -> list[tuple]:
    """GEMV tiles. With bf16 activations a thread loads 8 weight bytes of each of its R rows a
    step, R = BLOCK_N / (warps * 32 / (BLOCK_K / 8)) (BLOCK_K 256: BLOCK_N / warps): a larger R
    puts more bytes in flight, a smaller one re-reads fewer activations from L1."""
    one = [(1, bn, bk, sk, 4, 2) for bn, bk in ((32, 256), (16, 256), (8, 256), (64, 128))
           for sk in (1, 4)]
    more = [(1, 16, 512, 1, 4, 2), (1, 32, 256, 2, 4, 2), (1, 16, 256, 1, 8, 2),
            (1, 32, 256, 1, 4, 3), (2, 32, 256, 1, 4, 2), (2, 16, 256, 2, 4, 2),
            (4, 32, 256, 1, 4, 2), (4, 16, 256, 1, 4, 2), (4, 8, 256, 1, 4, 2),
            (4, 16, 256, 4, 4, 2), (8, 32, 256, 1, 4, 2), (8, 16, 256, 1, 4, 2)]
    # R = 1-4 with K repeated in each thread instead (warps span K first): fewest activation
    # re-reads (if the compiler does not merge a thread's identical loads), 16-32 bytes a step
    thin = [(1, 1, 1024, 1, 2, 2), (1, 2, 1024, 1, 2, 2), (1, 4, 1024, 1, 1, 2),
            (4, 2, 1024, 1, 2, 2)]
    return one + more + thin


def _small_space() -> list[tuple]:
    """Decode: GEMV tiles (1-8 rows a pass), 16-row dots with split-K, and 32/64-row dots for
    the dense projections at batch 32-64 (one group, all rows in one tile: weights read once)."""
    dots = [(16, 16, 256, 1, 2, 4), (16, 32, 256, 1, 4, 3), (16, 64, 128, 1, 4, 4),
            (16, 64, 256, 4, 4, 3), (16, 32, 256, 4, 4, 3), (16, 128, 128, 2, 4, 4),
            (16, 16, 256, 4, 2, 4), (16, 128, 256, 1, 8, 3)]
    medium = [(32, 64, 256, 1, 4, 3), (64, 64, 128, 1, 4, 4), (64, 32, 256, 1, 4, 3),
              (64, 128, 128, 1, 8, 3), (64, 64, 256, 2, 4, 3), (64, 32, 256, 4, 4, 3)]
    return _gemv_space() + dots + medium


def _large_space() -> list[tuple]:
    """Prefill (>= 64 rows per expert): tensor-core tiles."""
    return [(64, 128, 64, 1, 4, 4), (128, 128, 64, 1, 8, 3), (64, 256, 64, 1, 8, 3),
            (128, 128, 64, 1, 4, 4), (128, 256, 64, 1, 8, 3), (128, 256, 64, 1, 8, 4),
            (128, 128, 128, 1, 8, 3), (256, 128, 64, 1, 8, 3), (64, 128, 128, 1, 4, 3),
            (128, 64, 128, 1, 4, 4)]


SMALL_SPACE = _small_space()   # what `quant_slice.py --sweep` times for decode
LARGE_SPACE = _large_space()   # ... and for prefill


def is_decode_config(cfg) -> bool:
    """A config of the decode space (the sweep times it on the decode cases)."""
    return tuple(cfg) in set(SMALL_SPACE)


# the shortlists timed at run time for a key without a SHIPPED entry (each compiles once);
# the GEMV ones end with the 16-row dots that won before the GEMV kernel existed
def _gemv_shortlist(rows: int) -> list[tuple]:
    bm = min(rows, 4)
    first = [(bm, 32, 256, 1, 4, 2)]
    rest = [(1, 32, 256, 1, 4, 2), (1, 16, 256, 4, 4, 2), (1, 64, 128, 1, 4, 2),
            (1, 2, 1024, 1, 2, 2), (2, 32, 256, 1, 4, 2), (4, 32, 256, 1, 4, 2),
            (16, 32, 256, 1, 4, 3), (16, 16, 256, 1, 2, 4)]
    return first + [c for c in rest if c not in first]


_GEMV = {b: _gemv_shortlist(b) for b in (1, 2, 4, 8)}
_DECODE = [(16, 64, 128, 1, 4, 4), (16, 64, 256, 4, 4, 3), (8, 32, 256, 1, 4, 2),
           (16, 32, 256, 4, 4, 3), (16, 128, 128, 2, 4, 4),
           (16, 16, 256, 1, 2, 4), (16, 128, 256, 1, 8, 3)]
_MEDIUM = [(32, 64, 128, 1, 4, 4), (32, 128, 128, 1, 4, 3), (64, 128, 64, 1, 4, 4),
           (64, 64, 128, 1, 4, 3), (32, 64, 128, 2, 4, 4), (64, 32, 256, 1, 4, 3),
           (64, 32, 256, 4, 4, 3)]
_PREFILL = [(64, 128, 64, 1, 4, 4), (128, 128, 64, 1, 8, 3), (64, 256, 64, 1, 8, 3),
            (128, 128, 64, 1, 4, 4), (128, 256, 64, 1, 8, 3)]
_INTERPRETED = (16, 32, 32, 1, 4, 1)
_INTERPRETED_GEMV = (4, 16, 32, 1, 4, 1)  # the interpreter's pick for <= GEMV_MAX_ROWS rows

# Measured winners per GPU (device-name substring -> {(format, N, K, groups, rows bucket): config}),
# from `python benchmarks/quant_slice.py --sweep` (it prints this dict's entry).
SHIPPED: dict[str, dict[tuple, tuple]] = {}
# measured 2026-12-02 on an NVIDIA H200, torch 2.11.0+cu130, Triton 3.6.0 (Text-01 widths; BENCHMARKS.md)
# The decode keys were dropped when the GEMV kernel and the magic-number int8 widening came
# (their 16-row dots ran at 10-39% of the floor, 64-73% for the experts at batch 16-64): until the
# next sweep they are tuned at run time over candidates(rows): GEMV tiles and the old winners.
SHIPPED['H200'] = {
    ('int8', 6144, 8192, 1, 8192): (256, 128, 64, 1, 8, 3),  # out prefill 8192: 1.7339 ms, 1% of floor
    ('int8', 6144, 9216, 32, 16384): (256, 128, 64, 1, 8, 3),  # w2 prefill 8192: 4.5824 ms, 9% of floor
    ('int8', 8192, 6144, 1, 8192): (256, 128, 64, 1, 8, 3),  # gate prefill 8192: 1.7274 ms, 1% of floor
    ('int8', 18432, 6144, 32, 16384): (256, 128, 64, 1, 8, 3),  # w13 prefill 8192: 8.0228 ms, 11% of floor
    ('int8', 24576, 6144, 1, 8192): (256, 128, 64, 1, 8, 3),  # qkv prefill 8192: 4.6118 ms, 1% of floor
}
_best: dict[tuple, tuple] = {}


def rows_bucket(m: int) -> int:
    """The tuning key's rows: the next power of two of the rows of the launch."""
    return triton.next_power_of_2(max(int(m), 1))


def candidates(rows_per_group: int) -> list[tuple]:
    b = triton.next_power_of_2(max(rows_per_group, 1))
    if b <= GEMV_MAX_ROWS:
        return _GEMV[b]
    return _DECODE if b <= 16 else _MEDIUM if b <= 64 else _PREFILL


def check_config(cfg) -> tuple:
    """A config tuple, validated (powers of two, BLOCK_M < 16 only for the GEMV form)."""
    cfg = tuple(int(v) for v in cfg)
    if len(cfg) != 6:
        raise ValueError(f"a grouped_w8 config is (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, "
                         f"num_stages), got {cfg}")
    bm, bn, bk, sk, warps, stages = cfg
    if any(v <= 0 or v & (v - 1) for v in (bm, bn, bk, warps)) or sk < 1 or stages < 1:
        raise ValueError(f"grouped_w8 config {cfg}: blocks and warps must be powers of two, "
                         f"SPLIT_K and stages >= 1")
    if bm >= 16 and (bn < 16 or bk < 16):
        raise ValueError(f"grouped_w8 config {cfg}: a tensor-core tile needs BLOCK_N, BLOCK_K >= 16")
    return cfg


def shipped_for(device: torch.device) -> dict[tuple, tuple]:
    """SHIPPED's entry whose key is part of the device's name (longest match), else {}."""
    if device.type != "cuda":
        return {}
    name = torch.cuda.get_device_name(device)
    keys = sorted((k for k in SHIPPED if k in name), key=len, reverse=True)
    return SHIPPED[keys[0]] if keys else {}


def _launch(cfg, x, q, scale, y, offs, m, groups, rows_per_group, dense):
    bm, bn, bk, split_k, warps, stages = cfg
    n, k = q.shape[-2], q.shape[-1]
    fp8 = q.dtype != torch.int8
    w = q.view(torch.uint8) if fp8 else q
    if bm < 16:
        launch_gemv(cfg, x, w, scale, y, offs, m, groups, dense, fp8, interpreted(x.device))
        return
    split_k = max(1, min(split_k, triton.cdiv(k, bk)))
    k_split = triton.cdiv(triton.cdiv(k, split_k), bk) * bk
    nsplit = max(1, min(64, triton.cdiv(rows_per_group, bm)))
    out = y if split_k == 1 else torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    compact = not dense and m < groups  # at most m groups have rows: launch only m of them
    grid = (nsplit * split_k, triton.cdiv(n, bn), min(groups, m) if compact else groups)
    extra = {} if interpreted(x.device) else {"num_warps": warps, "num_stages": stages}
    grouped_w8_kernel.at(x.device)[grid](
        x, w, scale, out, offs if offs is not None else scale,
        m, n, k, groups, k_split, x.stride(0), q.stride(0) if q.dim() == 3 else 0, q.stride(-2),
        scale.stride(0) if scale.dim() == 2 else 0, m * n if split_k > 1 else 0, n,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split_k, FP8=fp8, DENSE=dense,
        COMPACT=compact, G_POW2=triton.next_power_of_2(groups), EVEN_K=k % bk == 0,
        IEEE=x.dtype == torch.float32 or interpreted(x.device), **extra)
    if split_k > 1:  # fp32 partials summed in fp32, in order, rounded once
        sum_splits_kernel.at(x.device)[(triton.cdiv(m * n, 1024),)](
            out, y, m * n, split_k, BLOCK=1024, **({"num_warps": 4} if extra else {}))


def balanced_offs(m: int, groups: int, device) -> torch.Tensor:
    """Row offsets of m rows spread evenly over min(groups, m) groups (the tuning routing)."""
    t = min(groups, m)
    counts = torch.zeros(groups, dtype=torch.int64)
    counts[:t] = m // t
    counts[: m % t] += 1
    offs = torch.zeros(groups + 1, dtype=torch.int32)
    offs[1:] = torch.cumsum(counts, 0)
    return offs.to(device)


def time_config(cfg, args, reps: int = 5) -> float:
    """Milliseconds per launch of `cfg` (CUDA events, after one warm launch)."""
    _launch(cfg, *args)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        _launch(cfg, *args)
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / reps


def _reference(args) -> torch.Tensor:
    """The twin's output for a tuning launch (candidates that disagree with it are dropped)."""
    x, q, scale, _, offs, m, groups, _, dense = args
    if dense:
        return grouped_mm_q_torch(x, q[None], scale[None], torch.tensor([m]))
    return grouped_mm_q_torch(x, q, scale, (offs[1:] - offs[:-1]).cpu())


def _tune(key, args) -> tuple:
    """The fastest candidate for `key` whose output matches the twin's, timed once on a balanced
    routing of the launch's rows."""
    if key in _best:
        return _best[key]
    x, q, scale, y, offs, m, groups, rows, dense = args
    cands = candidates(rows)
    if os.environ.get("MINIMAX01_QUANT_AUTOTUNE", "1") == "0" or torch.cuda.is_current_stream_capturing():
        return cands[0]
    if not dense:
        args = (x, q, scale, y, balanced_offs(m, groups, x.device), m, groups, rows, dense)
    want = _reference(args).float()
    times = []
    for cfg in cands:
        try:
            _launch(cfg, *args)
            err = ((y.float() - want).norm() / want.norm().clamp_min(1e-30)).item()
            if not err < TUNE_TOL:
                log.warning("grouped_w8 config %s is off by %.2e on %s: not used", cfg, err, key)
                continue
            times.append((time_config(cfg, args), cfg))
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
    if config is not None:
        config = check_config(config)
    elif interpreted(x.device):  # the CUDA dispatch's kernel for this many rows, tiny tiles
        config = _INTERPRETED_GEMV if rows <= GEMV_MAX_ROWS else _INTERPRETED
    else:
        key = ("int8" if q.dtype == torch.int8 else "fp8", n, k, groups, rows_bucket(m))
        shipped = shipped_for(x.device) if x.dtype == torch.bfloat16 else {}
        config = shipped.get(key) or _tune(key + (x.dtype,), args)
    _launch(config, *args)
    return y


def dequantize_w8(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[..., N, K] = q * scale[..., None] (formed in fp32, rounded once to out's dtype) for
    contiguous q [..., N, K] int8 | float8_e4m3fn and scale [..., N]; returns out."""
    if not q.is_contiguous() or out.shape != q.shape or not out.is_contiguous():
        raise ValueError("dequantize_w8: q and out must be contiguous and of the same shape")
    k = q.shape[-1]
    r = q.numel() // max(k, 1)
    if r == 0 or k == 0:
        return out
    fp8 = q.dtype != torch.int8
    w = q.view(torch.uint8) if fp8 else q
    s = scale.float().contiguous().reshape(-1)
    br, bk = (16, 32) if interpreted(q.device) else (8, 512)
    grid = (triton.cdiv(r, br), triton.cdiv(k, bk))
    extra = {} if interpreted(q.device) else {"num_warps": 4}
    dequant_w8_kernel.at(q.device)[grid](w, s, out, r, k, BLOCK_R=br, BLOCK_K=bk, FP8=fp8, **extra)
    return out
