"""Triton lightning attention: the autograd Function and the launch sequence of each direction.

Forward:   [split only] local states of segments -> combine -> scan (q, k, v) -> o, final state.
Backward:  dq = scan(do, v, k) from the forward's start states (transposed),
           [split only] local reverse states of (q, do) -> combine from dS_final -> d initial,
           dv = reverse scan(k, q, do), dk = reverse scan(v, do, q) from those reverse states.
Nothing per block is stored between forward and backward: only the start state of each segment
(none when a document is one item). See triton_scan.py for the scan itself and docs/kernels.md
for why it is laid out this way."""

from __future__ import annotations

import torch
import triton

from .triton_combine import combine_kernel
from .triton_decode import triton_lightning_decode
from .triton_jit import interpreted
from .triton_plan import _OVERRIDES, Plan, block_t_for, make_plan, tile_config
from .triton_scan import scan_kernel

__all__ = ["triton_lightning_attn", "triton_lightning_decode"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _strides(state, transpose=False):
    """(row, head, key, value) strides of a [N, H, X, Y] state; transposed reads it as Y x X."""
    if state is None:
        return (0, 0, 0, 0)
    s = state.stride()
    return (s[0], s[1], s[3], s[2]) if transpose else tuple(s)


def _prec(dtype):
    """fp32 inputs get true fp32 products ("ieee"), not tf32: fp32 callers ask for accuracy."""
    if "prec" in _OVERRIDES:
        return _OVERRIDES["prec"]
    return "ieee" if dtype == torch.float32 else None


def _scan(plan: Plan, slope, a, b, v, out, *, s_in=None, s_in_t=False, s_out=None,
          reverse=False, state_only=False, kind="fwd"):
    """One scan_kernel launch over all work items. a, b: [N_tok, H, DK]; v, out: [N_tok, H, DV];
    s_in / s_out: [rows, H, ., .] fp32 states indexed by work item (read transposed if s_in_t)."""
    _, h, dk = b.shape
    dv = v.shape[-1]
    cfg = tile_config(dk, dv, kind, v.element_size(), plan.block_t)
    grid = (plan.n_items * h * triton.cdiv(dv, cfg.block_v),)
    if grid[0] == 0:
        return
    dummy = v
    scan_kernel.at(v.device)[grid](
        a if a is not None else dummy, b, v, out if out is not None else dummy,
        s_in if s_in is not None else dummy, s_out if s_out is not None else dummy,
        plan.items, slope, h, b.stride(0), v.stride(0),
        *_strides(s_in, s_in_t), *_strides(s_out), DK=dk, DV=dv,
        BLOCK_T=plan.block_t, BLOCK_K=cfg.block_k, BLOCK_V=cfg.block_v,
        REVERSE=int(reverse), STATE_ONLY=state_only, HAS_S_IN=s_in is not None,
        STORE_S=s_out is not None, PREC=_prec(v.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _combine(plan: Plan, slope, buf, s0, final, reverse):
    """Local segment states in `buf` [n_items, H, DK, DV] -> start states (in place); the last
    carry of each document goes to `final` [n_docs, H, DK, DV]."""
    _, h, dk, dv = buf.shape
    bk = min(64, max(16, triton.next_power_of_2(dk)))
    bv = min(64, max(16, triton.next_power_of_2(dv)))
    grid = (plan.n_docs * h * triton.cdiv(dk, bk) * triton.cdiv(dv, bv),)
    if grid[0] == 0:
        return
    combine_kernel.at(buf.device)[grid](
        buf, s0 if s0 is not None else buf, final if final is not None else buf,
        plan.items, plan.doc_first, slope, h, dk, dv, *_strides(s0), *_strides(final),
        BLOCK_K=bk, BLOCK_V=bv, REVERSE=int(reverse), HAS_S0=s0 is not None,
        STORE_FINAL=final is not None, num_warps=4)


def _forward(plan, slope, q, k, v, s0, need_final):
    """q, k: [N_tok, H, D]; v: [N_tok, H, E]. Returns (o, final or None, start states or None)."""
    n_tok, h, d = q.shape
    e = v.shape[-1]
    o = torch.empty(n_tok, h, e, dtype=q.dtype, device=q.device)
    final = (torch.empty(plan.n_docs, h, d, e, dtype=torch.float32, device=q.device)
             if need_final else None)
    if not plan.segmented:
        _scan(plan, slope, q, k, v, o, s_in=s0, s_out=final)
        return o, final, None
    starts = torch.empty(plan.n_items, h, d, e, dtype=torch.float32, device=q.device)
    _scan(plan, slope, None, k, v, None, s_out=starts, state_only=True)
    _combine(plan, slope, starts, s0, final, reverse=False)
    _scan(plan, slope, q, k, v, o, s_in=starts)
    return o, final, starts


def _backward(plan, slope, q, k, v, s0, starts, do, dsf, need):
    """Gradients (dq, dk, dv, ds0) of the flattened problem; `need` flags which are wanted."""
    n_tok, h, d = q.shape
    e = v.shape[-1]
    dq = dk = dv = ds0 = None
    if need[0]:
        dq = torch.empty_like(q)
        if plan.segmented:
            _scan(plan, slope, do, v, k, dq, s_in=starts, s_in_t=True, kind="bwd")
        else:
            _scan(plan, slope, do, v, k, dq, s_in=s0, s_in_t=True, kind="bwd")
    if not (need[1] or need[2] or need[3]):
        return dq, dk, dv, ds0
    want_ds0 = need[3]
    if want_ds0:
        ds0 = torch.empty(plan.n_docs, h, d, e, dtype=torch.float32, device=q.device)
    if plan.segmented:
        rev = torch.empty(plan.n_items, h, d, e, dtype=torch.float32, device=q.device)
        _scan(plan, slope, None, q, do, None, s_out=rev, reverse=True, state_only=True, kind="bwd")
        _combine(plan, slope, rev, dsf, ds0, reverse=True)
    else:
        rev = dsf
    if need[2] or (want_ds0 and not plan.segmented):
        dv = torch.empty_like(v)
        _scan(plan, slope, k, q, do, dv, s_in=rev, reverse=True,
              s_out=ds0 if not plan.segmented else None, kind="bwd")
    if need[1]:
        dk = torch.empty_like(k)
        _scan(plan, slope, v, do, q, dk, s_in=rev, s_in_t=True, reverse=True, kind="bwd")
    return dq, dk, dv, ds0


class _LightningTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slope, s0, plan, need_final):
        b, t, h, d = q.shape
        e = v.shape[-1]
        q3, k3, v3 = (x.reshape(b * t, h, x.shape[-1]) for x in (q, k, v))
        o, final, starts = _forward(plan, slope, q3, k3, v3, s0, need_final)
        ctx.save_for_backward(q3, k3, v3, slope, s0, starts)
        ctx.plan = plan
        ctx.shape = (b, t, h, d, e)
        if final is not None:
            return o.view(b, t, h, e), final
        return o.view(b, t, h, e), None

    @staticmethod
    def backward(ctx, do, dsf):
        q3, k3, v3, slope, s0, starts = ctx.saved_tensors
        b, t, h, d, e = ctx.shape
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2],
                ctx.needs_input_grad[4])
        do3 = do.reshape(b * t, h, e).contiguous().to(q3.dtype)
        if dsf is not None:
            dsf = dsf.to(torch.float32).contiguous()
        dq, dk, dv, ds0 = _backward(ctx.plan, slope, q3, k3, v3, s0, starts, do3, dsf, need)
        dq = dq.view(b, t, h, d) if dq is not None else None
        dk = dk.view(b, t, h, d) if dk is not None else None
        dv = dv.view(b, t, h, e) if dv is not None else None
        return dq, dk, dv, None, ds0, None, None


def triton_lightning_attn(q, k, v, slope, initial_state=None, cu_seqlens=None, block_size=None,
                          output_final_state=False):
    """Lightning attention on Triton kernels; inputs already validated by `lightning_attn`.

    Returns (o [B, T, H, E] in q.dtype, final state [N, H, D, E] fp32 or None). Differentiable
    in q, k, v and initial_state (including through the final state); not in slope."""
    if q.dtype not in _DTYPES:
        raise TypeError(f"the triton backend takes fp16, bf16 or fp32 inputs, got {q.dtype}")
    if q.dtype == torch.bfloat16 and interpreted(q.device):
        # Triton 3.9's interpreter does bf16 arithmetic on the raw 16-bit patterns; run the same
        # kernels in fp32 there and round the output (fp16 keeps the half-precision code path)
        o, final = triton_lightning_attn(q.float(), k.float(), v.float(), slope, initial_state,
                                         cu_seqlens, block_size, output_final_state)
        return o.to(torch.bfloat16), final
    b, t, h, d = q.shape
    e = v.shape[-1]
    q, k, v = (x.contiguous() for x in (q, k, v))
    slope = slope.detach().to(device=q.device, dtype=torch.float32).contiguous()
    s0 = None
    if initial_state is not None:
        s0 = initial_state
        if s0.dtype != torch.float32:
            s0 = s0.float()
        s0 = s0.contiguous()
    if cu_seqlens is not None:
        offsets = [int(x) for x in cu_seqlens.tolist()]
    else:
        offsets = list(range(0, b * t + 1, t)) if t > 0 else [0] * (b + 1)
    block_t = block_t_for(block_size)
    n_vt = triton.cdiv(e, tile_config(d, e, "fwd", q.element_size(), block_t).block_v)
    plan = make_plan(offsets, h, n_vt, block_t, q.device)
    return _LightningTriton.apply(q, k, v, slope, s0, plan, bool(output_final_state))
