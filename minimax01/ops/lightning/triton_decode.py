"""One decode step, S <- lam S + k^T v and o = q S, for a batch of sequences in one launch.

Pure state streaming: each program reads a D x BLOCK_V slice of one sequence's fp32 state once
and writes it back once, so the step runs at memory bandwidth (2 * H * D * E * 4 bytes per
sequence). `slot_idx` maps batch rows to rows of a larger state pool; rows not named are never
touched. A slot outside [0, N) (a bad index on the GPU, which the host does not read back) makes
its program touch nothing and write NaN outputs: never an out-of-bounds access, never a silent
plausible result. Host-side checks of the indices live in checks.py."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_jit import kernel
from .triton_tune import tuning


@kernel
def decode_kernel(
    Q, K, V, S, O, SLOPE, SLOT,
    H, n_rows, sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, so_b, so_h,
    ss_r, ss_h, ss_k,
    DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, HAS_SLOT: tl.constexpr,
    EVEN: tl.constexpr, EVICT: tl.constexpr,
):
    pid = tl.program_id(0)
    iv = tl.program_id(1)
    b = pid // H
    h = pid % H
    if HAS_SLOT:
        row = tl.load(SLOT + b).to(tl.int64)
        ok = (row >= 0) & (row < n_rows)
        row = tl.where(ok, row, 0)
    else:
        row = b.to(tl.int64)
        ok = row >= 0
    ck = tl.arange(0, BLOCK_K)
    cv = iv * BLOCK_V + tl.arange(0, BLOCK_V)
    mk = ck < DK
    mv = cv < DV
    p_s = S + row * ss_r + h * ss_h + ck[:, None] * ss_k + cv[None, :]
    # the state is streamed once: EVICT keeps it from pushing q, k, v and the next rows out of L2
    # (a mask uniform along the rows keeps the 16-byte vector loads and stores when EVEN)
    if EVEN:
        m_s = (tl.full([BLOCK_K, BLOCK_V], 1, tl.int1) & ok) != 0
    else:
        m_s = (mk[:, None] & mv[None, :] & ok) != 0
    if EVICT:
        st = tl.load(p_s, mask=m_s, other=0.0, eviction_policy="evict_first")
    else:
        st = tl.load(p_s, mask=m_s, other=0.0)
    cdt = st.dtype
    q = tl.load(Q + b * sq_b + h * sq_h + ck, mask=mk, other=0.0).to(cdt)
    k = tl.load(K + b * sk_b + h * sk_h + ck, mask=mk, other=0.0).to(cdt)
    v = tl.load(V + b * sv_b + h * sv_h + cv, mask=mv, other=0.0).to(cdt)
    lam = tl.exp(-tl.load(SLOPE + h).to(cdt))
    st = st * lam + k[:, None] * v[None, :]
    if EVICT:
        tl.store(p_s, st, mask=m_s, eviction_policy="evict_first")
    else:
        tl.store(p_s, st, mask=m_s)
    o = tl.sum(q[:, None] * st, axis=0)
    o = tl.where(ok, o, float("nan"))
    tl.store(O + b * so_b + h * so_h + cv, o.to(O.dtype.element_ty), mask=mv)


def decode_config(b: int, h: int, d: int, e: int, device: torch.device):
    """(block_v, num_warps, evict): the tuned row for B*H (triton_tune.Tuning.decode), else the widest
    value slice that still leaves >= 512 programs (measured on H100: 128-wide slices stream
    2.9-3.0 TB/s at batch >= 64; at batch 1 narrow slices keep more bytes in flight)."""
    block_k = max(16, triton.next_power_of_2(d))
    full_v = max(16, triton.next_power_of_2(e))
    rows = [r for r in tuning(device).decode if r[0] <= b * h]
    if rows and e == 128 and d == 128:
        row = max(rows)
        return min(row[1], full_v), row[2], bool(row[3]) if len(row) > 3 else False
    block_v = full_v
    while block_v > 16 and b * h * triton.cdiv(e, block_v) < 512:
        block_v //= 2
    return block_v, max(2, min(8, block_k * block_v // 2048)), False


def triton_lightning_decode(q, k, v, state, slope, slot_idx=None, block_v=None, num_warps=None,
                            evict=None):
    """q, k: [B, H, D]; v: [B, H, E]; state: [N, H, D, E] fp32 (fp64 works too), updated in
    place (rows `slot_idx` [B] when given, else rows 0..B-1). Returns o [B, H, E] in q.dtype."""
    b, h, d = q.shape
    e = v.shape[-1]
    if state.stride(-1) != 1:
        raise ValueError("the state's last dim must be contiguous")
    o = torch.empty(b, h, e, dtype=q.dtype, device=q.device)
    if b == 0:
        return o
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    slope = slope.to(device=q.device, dtype=torch.float32).contiguous()
    block_k = max(16, triton.next_power_of_2(d))
    tuned_v, tuned_w, tuned_evict = decode_config(b, h, d, e, q.device)
    block_v = block_v or tuned_v
    num_warps = num_warps or tuned_w
    evict = tuned_evict if evict is None else evict
    # int64 stays int64: a cast could wrap a huge bad index onto a real row
    slot = slot_idx.to(device=q.device, non_blocking=True) if slot_idx is not None else o
    grid = (b * h, triton.cdiv(e, block_v))
    decode_kernel.at(q.device)[grid](
        q, k, v, state, o, slope, slot, h, state.shape[0],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        o.stride(0), o.stride(1), state.stride(0), state.stride(1), state.stride(2),
        DK=d, DV=e, BLOCK_K=block_k, BLOCK_V=block_v, HAS_SLOT=slot_idx is not None,
        EVEN=(d == block_k and e % block_v == 0), EVICT=bool(evict), num_warps=num_warps)
    return o
