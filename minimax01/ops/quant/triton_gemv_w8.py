"""The GEMV form of the 8-bit grouped matmul (W8A16) for a few rows per group (decode): no
tensor-core dot, so nothing is spent padding 1-8 rows to an MMA tile, staging weights through
shared memory or converting them twice (int8 -> fp32 -> bf16).

    y[rows of group e] = (x[rows of e] @ q[e]^T) * scale[e]      same contract as triton_w8.py

Program (n, s, e) owns output channels [n*BLOCK_N, (n+1)*BLOCK_N) of group e and K slice s
(SPLIT_K slices). It streams the weight tile as [BLOCK_N, BLOCK_K / VEC, VEC] (weights are
[N, K] row-major, nn.Linear layout; VEC = 8 contiguous bytes a thread with bf16 activations,
whose VEC values are one 128-bit load), widens it to fp32, multiplies by the group's rows
(BLOCK_M at a time, broadcast over the tile) and sums the VEC products of each thread in
registers; the partial sums [BLOCK_M, BLOCK_N,
BLOCK_K / VEC] are reduced across threads once, after the K loop, and the per-channel scale
is applied once. Rows beyond BLOCK_M re-read the program's weight slice (from L2). Groups
without rows skip their loop; with fewer rows than groups only M programs run on the group axis
(found from `offs` on the device, as in triton_w8.py), so a batch-1 step touches 2 experts.

int8 -> fp32 without an int-to-float conversion instruction (the CUDA guide's throughput table
lists conversions at 16 per clock per SM on sm_80/sm_90, a quarter of the fp32 FMA rate: ~4.2 T/s
on an H200, no faster than HBM delivers int8 bytes): q + 0x4B000080 read as fp32 is
2^23 + 128 + q exactly, minus 2^23 + 128 gives q (one integer add, one fp32 add; never slower). fp8 e4m3 goes through its
fp16 bit pattern (as in triton_w8.py).

SPLIT_K > 1 writes fp32 partials [SPLIT_K, M, N] that `sum_splits_kernel` adds in a fixed
order (deterministic, one small launch, no atomics) and rounds once to the output dtype."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_jit import kernel


@kernel
def gemv_w8_kernel(
    X, W, S, Y, OFFS,
    M, N, K, G, K_SPLIT, sx_m, sw_e, sw_n, ss_e, sy_s, sy_m,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr,
    FP8: tl.constexpr, DENSE: tl.constexpr, COMPACT: tl.constexpr, G_POW2: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    ks = tl.program_id(1)
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
    rc = tl.arange(0, BLOCK_K // VEC)
    rv = tl.arange(0, VEC)
    koff = rc[:, None] * VEC + rv[None, :]  # [KC, VEC]: VEC contiguous bytes per thread
    k_lo = ks * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    w_rows = W + e.to(tl.int64) * sw_e + rn[:, None, None].to(tl.int64) * sw_n  # [BN, 1, 1]
    y_part = Y + ks.to(tl.int64) * sy_s
    zn = tl.zeros([1, BLOCK_N, 1, 1], dtype=tl.int64)
    for m0 in range(start, end, BLOCK_M):  # an empty group runs no iteration
        rm = m0 + tl.arange(0, BLOCK_M)
        mm = rm < end
        # x is addressed as [BM, BN, KC, VEC] (constant along BN): its load then gets the same
        # register layout as the weight tile's, so the product needs no layout conversion
        x_rows = X + rm[:, None, None, None].to(tl.int64) * sx_m + zn  # [BM, BN, 1, 1]
        mx = mm[:, None, None, None] & (zn == 0)
        acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = (k0 + koff)[None, :, :]  # [1, KC, VEC]
            if EVEN_K:
                if EVEN_N:
                    w = tl.load(w_rows + kk)
                else:
                    w = tl.load(w_rows + kk, mask=mn[:, None, None], other=0)
                xv = tl.load(x_rows + kk[None], mask=mx, other=0.0)
            else:
                mk = kk < k_hi
                w = tl.load(w_rows + kk, mask=mn[:, None, None] & mk, other=0)
                xv = tl.load(x_rows + kk[None], mask=mx & mk[None], other=0.0)
            if FP8:  # W holds the e4m3 bytes as uint8; their fp16 pattern is the value * 2^-8
                b = w.to(tl.int32)
                bits = ((b & 0x80) << 8) | ((b & 0x7F) << 7)
                wf = bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            else:  # exact int8 -> fp32 on the integer and fp32 pipes (see the module docstring)
                wf = (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
            prod = xv.to(tl.float32) * wf[None, :, :, :]  # [BM, BN, KC, VEC]
            acc += tl.sum(prod, axis=3)  # within each thread
        y = tl.sum(acc, axis=2)  # across threads, once per row block
        scale = tl.load(S + e * ss_e + rn, mask=mn, other=0.0).to(tl.float32)
        if FP8:
            scale = scale * 256.0
        y = y * scale[None, :]
        tl.store(y_part + rm[:, None].to(tl.int64) * sy_m + rn[None, :],
                 y.to(Y.dtype.element_ty), mask=mm[:, None] & mn[None, :])


@kernel
def sum_splits_kernel(P, Y, MN, SPLITS, BLOCK: tl.constexpr):
    """Y[i] = sum over s of P[s, i] (fp32, in order s = 0, 1, ...), rounded once to Y's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    p = P + offs
    for _ in range(0, SPLITS):
        acc += tl.load(p, mask=mask, other=0.0)
        p += MN
    tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=mask)


def vec_for(block_k: int, x_bytes: int) -> int:
    """Weight bytes per thread per load: as many as one 128-bit load of activations holds (8
    for bf16: both loads then share one register layout), at most the whole block."""
    return min(16 // x_bytes, block_k)


def launch_gemv(cfg, x, w, scale, y, offs, m, groups, dense, fp8, interpreted):
    """One GEMV launch (and, with SPLIT_K > 1, the split sum) of config `cfg` =
    (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages); w is q (int8) or q viewed
    as uint8 (fp8). Same arguments as triton_w8._launch."""
    bm, bn, bk, split_k, warps, stages = cfg
    n, k = w.shape[-2], w.shape[-1]
    split_k = max(1, min(split_k, triton.cdiv(k, bk)))
    k_split = triton.cdiv(triton.cdiv(k, split_k), bk) * bk
    split_k = triton.cdiv(k, k_split)  # no split left without K
    out = y if split_k == 1 else torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    compact = not dense and m < groups
    grid = (triton.cdiv(n, bn), split_k, min(groups, m) if compact else groups)
    extra = {} if interpreted else {"num_warps": warps, "num_stages": stages}
    gemv_w8_kernel.at(x.device)[grid](
        x, w, scale, out, offs if offs is not None else scale,
        m, n, k, groups, k_split, x.stride(0), w.stride(0) if w.dim() == 3 else 0, w.stride(-2),
        scale.stride(0) if scale.dim() == 2 else 0, m * n if split_k > 1 else 0, n,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, VEC=vec_for(bk, x.element_size()), FP8=fp8,
        DENSE=dense, COMPACT=compact, G_POW2=triton.next_power_of_2(groups), EVEN_K=k % bk == 0,
        EVEN_N=n % bn == 0, **extra)
    if split_k > 1:
        block = 1024
        sum_splits_kernel.at(x.device)[(triton.cdiv(m * n, block),)](
            out, y, m * n, split_k, BLOCK=block, **({} if interpreted else {"num_warps": 4}))
