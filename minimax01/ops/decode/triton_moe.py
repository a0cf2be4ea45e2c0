"""The Triton MoE for a few decode tokens (the twin is reference.py `torch_moe_decode`).

At batch 1 the serving MoE pipeline (route, plan, gather, two grouped matmuls, SwiGLU, combine)
is ~25 launches for 2 expert GEMVs. Here it is two, after the router matmul: every program
recomputes its token's routing from the router logits (softmax, top-k, renormalise: E values),
so no routing tensors exist between launches.
  * `_moe_up_kernel` (token x choice, BLOCK_I rows of the intermediate): the gate and up GEMVs
    of the chosen expert and SiLU(g) * u;
  * `_moe_down_kernel` (token, BLOCK_R rows of hidden): the down GEMV of each choice, weighted
    and summed.
Each token reads its k experts' whole weights, so this pays only while tokens x k is small
(`MOE_MAX_TOKENS` in __init__.py); beyond, the grouped matmul reads each expert once."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_jit import kernel




@triton.jit
def _routed(LOGITS, s_l, n, j, E, TOP_K: tl.constexpr, BLOCK_E: tl.constexpr):
    """(expert, renormalised weight) of choice j of token n (ops/moe.py `route`)."""
    c = tl.arange(0, BLOCK_E)
    lg = tl.load(LOGITS + n * s_l + c, mask=c < E, other=float("-inf")).to(tl.float32)
    p = tl.exp(lg - tl.max(lg, 0))
    p = p / tl.sum(p, 0)
    total = tl.sum(p * 0.0, 0)
    pick_e = tl.sum(c * 0, 0)
    pick_w = total
    for t in tl.static_range(TOP_K):
        m = tl.max(p, 0)
        idx = tl.min(tl.where(p == m, c, BLOCK_E), 0)  # the first of equal maxima
        total += m
        pick_e = tl.where(j == t, idx, pick_e)
        pick_w = tl.where(j == t, m, pick_w)
        p = tl.where(c == idx, -1.0, p)
    return pick_e.to(tl.int64), pick_w / total


@kernel
def _moe_up_kernel(X, LOGITS, GU, ACT, E, I, Hd, s_x, s_l, s_ge, s_gr, s_act,
                   TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_I: tl.constexpr,
                   BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    n = pid // TOP_K
    j = pid % TOP_K
    e, _ = _routed(LOGITS, s_l, n, j, E, TOP_K, BLOCK_E)
    rows = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mr = rows < I
    acc_g = tl.zeros([BLOCK_I], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_I], dtype=tl.float32)
    base = GU + e * s_ge
    for h0 in range(0, Hd, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        mc = cols < Hd
        x = tl.load(X + n * s_x + cols, mask=mc, other=0.0).to(tl.float32)
        m2 = mr[:, None] & mc[None, :]
        wg = tl.load(base + rows[:, None] * s_gr + cols[None, :], mask=m2, other=0.0)
        wu = tl.load(base + (rows + I)[:, None] * s_gr + cols[None, :], mask=m2, other=0.0)
        acc_g += tl.sum(wg.to(tl.float32) * x[None, :], 1)
        acc_u += tl.sum(wu.to(tl.float32) * x[None, :], 1)
    dt = ACT.dtype.element_ty  # rounded where the grouped path rounds
    g = acc_g.to(dt).to(tl.float32)
    u = acc_u.to(dt).to(tl.float32)
    a = (g * tl.sigmoid(g)).to(dt).to(tl.float32) * u
    tl.store(ACT + pid * s_act + rows, a.to(dt), mask=mr)


@kernel
def _moe_down_kernel(ACT, LOGITS, DN, OUT, E, I, Hd, s_l, s_de, s_dr, s_act, s_o,
                     TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_I: tl.constexpr):
    n = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mr = rows < Hd
    dt = OUT.dtype.element_ty
    out = tl.zeros([BLOCK_R], dtype=tl.float32)
    for j in range(TOP_K):  # a runtime loop: j is a tensor, as in the up kernel
        e, w = _routed(LOGITS, s_l, n, j, E, TOP_K, BLOCK_E)
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for i0 in range(0, I, BLOCK_I):
            cols = i0 + tl.arange(0, BLOCK_I)
            mc = cols < I
            a = tl.load(ACT + (n * TOP_K + j) * s_act + cols, mask=mc, other=0.0).to(tl.float32)
            wd = tl.load(DN + e * s_de + rows[:, None] * s_dr + cols[None, :],
                         mask=mr[:, None] & mc[None, :], other=0.0)
            acc += tl.sum(wd.to(tl.float32) * a[None, :], 1)
        y = acc.to(dt).to(tl.float32)
        out += (y * w.to(dt).to(tl.float32)).to(dt).to(tl.float32)
    tl.store(OUT + n * s_o + rows, out.to(dt), mask=mr)


def launch_moe(x, router_logits, gate_up, down, top_k):
    """`triton_moe_decode` (arguments as the twin's)."""
    n, hd = x.shape
    e, two_i, _ = gate_up.shape
    inter = two_i // 2
    out = torch.empty_like(x)
    if n == 0:
        return out
    if gate_up.stride(-1) != 1 or down.stride(-1) != 1 or x.stride(-1) != 1:
        raise ValueError("x and the expert weights need a contiguous last dim")
    act = torch.empty(n * top_k, inter, device=x.device, dtype=x.dtype)
    block_e = max(2, triton.next_power_of_2(e))
    cuda = x.is_cuda
    # GPU: narrow row blocks, so even one token gives a few hundred programs (bandwidth needs
    # many loads in flight; 1b at B=1: 2 x 192 up, 256 down)
    bi, bh = (4, 256) if cuda else (16, 32)
    _moe_up_kernel.at(x.device)[(n * top_k, triton.cdiv(inter, bi))](
        x, router_logits, gate_up, act, e, inter, hd, x.stride(0), router_logits.stride(0),
        gate_up.stride(0), gate_up.stride(1), act.stride(0),
        TOP_K=top_k, BLOCK_E=block_e, BLOCK_I=bi, BLOCK_H=bh, **({"num_warps": 4} if cuda else {}))
    br, bk = (8, 256) if cuda else (16, 32)
    _moe_down_kernel.at(x.device)[(n, triton.cdiv(hd, br))](
        act, router_logits, down, out, e, inter, hd, router_logits.stride(0), down.stride(0),
        down.stride(1), act.stride(0), out.stride(0),
        TOP_K=top_k, BLOCK_E=block_e, BLOCK_R=br, BLOCK_I=bk, **({"num_warps": 4} if cuda else {}))
    return out
