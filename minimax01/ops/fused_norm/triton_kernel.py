"""The Triton fused norms (twins: reference.py; entry points: __init__.py). One program per row
(x, residual, weight, or o, gate, weight, of one dtype); each value is rounded to the activations' dtype exactly where the model's torch code rounds it
(a torch elementwise op on bf16 computes in fp32 and rounds its result)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_jit import kernel


@kernel
def _residual_norm_kernel(X, R, W, Y, Hn, width, s_x, s_r, s_y, s_h, alpha, beta, eps,
                          HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    m = c < width
    dt = Y.dtype.element_ty
    x = tl.load(X + b * s_x + c, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + b * s_r + c, mask=m, other=0.0).to(tl.float32)
        ar = (alpha * r).to(dt).to(tl.float32)       # alpha * residual
        bx = (beta * x).to(dt).to(tl.float32)        # beta * x
        yf = (ar + bx).to(dt).to(tl.float32)         # their sum
        tl.store(Y + b * s_y + c, yf.to(dt), mask=m)
    else:
        yf = x
    rms = tl.rsqrt(tl.sum(yf * yf, axis=0) / width + eps)
    n = (yf * rms).to(dt).to(tl.float32)             # rms_norm: cast back before the weight
    w = tl.load(W + c, mask=m, other=0.0).to(tl.float32)
    tl.store(Hn + b * s_h + c, (w * n).to(Hn.dtype.element_ty), mask=m)


@kernel
def _gated_norm_kernel(O, G, W, U, width, s_o, s_g, s_u, eps, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    m = c < width
    dt = O.dtype.element_ty
    o = tl.load(O + b * s_o + c, mask=m, other=0.0).to(tl.float32)
    rms = tl.rsqrt(tl.sum(o * o, axis=0) / width + eps)
    n = (o * rms).to(dt).to(tl.float32)
    w = tl.load(W + c, mask=m, other=0.0).to(tl.float32)
    u = (w * n).to(dt).to(tl.float32)                # rms_norm's output
    g = tl.load(G + b * s_g + c, mask=m, other=0.0).to(tl.float32)
    s = tl.sigmoid(g).to(G.dtype.element_ty).to(tl.float32)
    tl.store(U + b * s_u + c, (s * u).to(U.dtype.element_ty), mask=m)


def _warps(block: int, device) -> dict:
    return {"num_warps": max(4, min(16, block // 256))} if device.type == "cuda" else {}


def _rows(*xs) -> None:
    if any(x.stride(-1) != 1 for x in xs):
        raise ValueError("the fused norms need a contiguous last dim")


def launch_residual_norm(x, weight, eps, residual=None, alpha=1.0, beta=1.0):
    n, width = x.shape
    y = torch.empty_like(x) if residual is not None else x
    h = torch.empty_like(x)  # one dtype for x, residual and weight (__init__.py)
    if n == 0:
        return y, h
    r = residual if residual is not None else x
    _rows(x, r)
    block = triton.next_power_of_2(width)
    _residual_norm_kernel.at(x.device)[(n,)](
        x, r, weight, y, h, width, x.stride(0), r.stride(0), y.stride(0), h.stride(0),
        float(alpha), float(beta), float(eps), HAS_RES=residual is not None, BLOCK=block,
        **_warps(block, x.device))
    return y, h


def launch_gated_norm(o, gate, weight, eps):
    n, width = o.shape
    u = torch.empty_like(o)  # one dtype for o, gate and weight (__init__.py)
    if n == 0:
        return u
    _rows(o, gate)
    block = triton.next_power_of_2(width)
    _gated_norm_kernel.at(o.device)[(n,)](
        o, gate, weight, u, width, o.stride(0), gate.stride(0), u.stride(0), float(eps),
        BLOCK=block, **_warps(block, o.device))
    return u
