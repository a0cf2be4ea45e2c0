"""The Triton fused lightning decode (the twin is reference.py, the entry point __init__.py).

Two launches replace the unfused step's SiLU, split, mask, decode, RMSNorm (~6 kernels), cast,
sigmoid and gate product:
  * `_state_kernel` (B*H x value slices, ops/lightning's decode tiling): SiLU of the head's
    q|k|v straight from qkv_proj's output, S <- lam S + k^T v in place, o = q S in fp32;
  * `_norm_gate_kernel` (one program per row): RMSNorm over all heads (the norm couples them,
    so it cannot live in the per-head programs) times the weight and sigmoid(gate).
No host reads: capturable in a CUDA graph. A slot index outside [0, N) touches no state and
gives NaN (the rule of ops/lightning/triton_decode.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..lightning.triton_decode import decode_config
from ..triton_jit import kernel


@kernel
def _state_kernel(QKV, S, O, SLOPE, SLOT, VALID, H, n_rows, s_qkv, ss_r, ss_h, ss_k,
                  D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
                  HAS_SLOT: tl.constexpr, HAS_VALID: tl.constexpr, EVEN: tl.constexpr):
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
    mk = ck < D
    mv = cv < D
    p_s = S + row * ss_r + h * ss_h + ck[:, None] * ss_k + cv[None, :]
    if EVEN:
        m_s = (tl.full([BLOCK_K, BLOCK_V], 1, tl.int1) & ok) != 0
    else:
        m_s = (mk[:, None] & mv[None, :] & ok) != 0
    st = tl.load(p_s, mask=m_s, other=0.0)
    cdt = st.dtype
    base = QKV + b.to(tl.int64) * s_qkv + h * 3 * D
    q = tl.load(base + ck, mask=mk, other=0.0).to(tl.float32)
    k = tl.load(base + D + ck, mask=mk, other=0.0).to(tl.float32)
    v = tl.load(base + 2 * D + cv, mask=mv, other=0.0).to(tl.float32)
    act = QKV.dtype.element_ty  # SiLU rounded to the activations' dtype, as the model's
    q = (q * tl.sigmoid(q)).to(act).to(cdt)
    k = (k * tl.sigmoid(k)).to(act).to(cdt)
    v = (v * tl.sigmoid(v)).to(act).to(cdt)
    if HAS_VALID:
        v = v * (tl.load(VALID + b) != 0).to(cdt)
    lam = tl.exp(-tl.load(SLOPE + h).to(cdt))
    st = st * lam + k[:, None] * v[None, :]
    tl.store(p_s, st, mask=m_s)
    o = tl.sum(q[:, None] * st, axis=0)
    o = tl.where(ok, o, float("nan"))
    tl.store(O + b.to(tl.int64) * H * D + h * D + cv, o.to(O.dtype.element_ty), mask=mv)


@kernel
def _norm_gate_kernel(O, GATE, W, U, width, s_gate, s_u, eps, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    m = c < width
    o = tl.load(O + b * width + c, mask=m, other=0.0)
    rms = tl.rsqrt(tl.sum(o * o, axis=0) / width + eps)
    g = tl.load(GATE + b * s_gate + c, mask=m, other=0.0).to(o.dtype)
    w = tl.load(W + c, mask=m, other=0.0).to(o.dtype)
    u = tl.sigmoid(g) * w * (o * rms)
    tl.store(U + b * s_u + c, u.to(U.dtype.element_ty), mask=m)


def launch(qkv, gate, state, slope, norm_weight, eps, slot_idx=None, valid=None):
    """`triton_lightning_decode_gated` (arguments as the twin's, reference.py)."""
    b, h = qkv.shape[0], slope.shape[0]
    d = qkv.shape[1] // (3 * h)
    width = h * d
    u = torch.empty(b, width, dtype=qkv.dtype, device=qkv.device)
    if b == 0:
        return u
    if state.stride(-1) != 1 or qkv.stride(-1) != 1 or gate.stride(-1) != 1:
        raise ValueError("state, qkv and gate need a contiguous last dim")
    o = torch.empty(b, width, dtype=state.dtype, device=qkv.device)
    slope = slope.to(device=qkv.device, dtype=torch.float32).contiguous()
    block_k = max(16, triton.next_power_of_2(d))
    block_v, num_warps, _ = decode_config(b, h, d, d, qkv.device)
    slot = slot_idx.to(device=qkv.device, non_blocking=True) if slot_idx is not None else o
    flag = valid.to(device=qkv.device, dtype=torch.int8) if valid is not None else o
    cuda = {"num_warps": num_warps} if qkv.is_cuda else {}
    _state_kernel.at(qkv.device)[(b * h, triton.cdiv(d, block_v))](
        qkv, state, o, slope, slot, flag, h, state.shape[0], qkv.stride(0),
        state.stride(0), state.stride(1), state.stride(2),
        D=d, BLOCK_K=block_k, BLOCK_V=block_v, HAS_SLOT=slot_idx is not None,
        HAS_VALID=valid is not None, EVEN=(d == block_k and d % block_v == 0), **cuda)
    block = triton.next_power_of_2(width)
    _norm_gate_kernel.at(qkv.device)[(b,)](
        o, gate, norm_weight, u, width, gate.stride(0), u.stride(0), float(eps), BLOCK=block,
        **({"num_warps": max(4, min(16, block // 256))} if qkv.is_cuda else {}))
    return u


@kernel
def _residual_norm_kernel(X, R, W, Y, Hn, width, s_x, s_r, s_y, s_h, alpha, beta, eps,
                          HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    m = c < width
    x = tl.load(X + b * s_x + c, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + b * s_r + c, mask=m, other=0.0).to(tl.float32)
        y = (alpha * r + beta * x).to(Y.dtype.element_ty)
        tl.store(Y + b * s_y + c, y, mask=m)
        yf = y.to(tl.float32)
    else:
        yf = x
    rms = tl.rsqrt(tl.sum(yf * yf, axis=0) / width + eps)
    n = (yf * rms).to(X.dtype.element_ty).to(tl.float32)  # rounded like ops/norm.rms_norm
    w = tl.load(W + c, mask=m, other=0.0).to(tl.float32)
    tl.store(Hn + b * s_h + c, (w * n).to(Hn.dtype.element_ty), mask=m)


def launch_residual_norm(x, weight, eps, residual=None, alpha=1.0, beta=1.0):
    """`triton_residual_rms_norm` (arguments as the twin's, reference.py)."""
    b, width = x.shape
    y = torch.empty_like(x) if residual is not None else x
    h = torch.empty(b, width, device=x.device, dtype=torch.promote_types(weight.dtype, x.dtype))
    if b == 0:
        return y, h
    r = residual if residual is not None else x
    if x.stride(-1) != 1 or r.stride(-1) != 1:
        raise ValueError("x and residual need a contiguous last dim")
    block = triton.next_power_of_2(width)
    _residual_norm_kernel.at(x.device)[(b,)](
        x, r, weight, y, h, width, x.stride(0), r.stride(0), y.stride(0), h.stride(0),
        float(alpha), float(beta), float(eps), HAS_RES=residual is not None, BLOCK=block,
        **({"num_warps": max(4, min(16, block // 256))} if x.is_cuda else {}))
    return y, h
