"""Triton lightning attention: the autograd Function and the launch sequence of each direction.

Forward:   [split only] local states of segments -> combine -> scan (q, k, v) -> o, final state.
Backward:  dq = scan(do, v, k) from the forward's start states (transposed),
           [split only] local reverse states of (q, do) -> combine from dS_final,
           dv = reverse scan(k, q, do) and dk = reverse scan(v, do, q), or both from one fused
           reverse scan (triton_dkdv.py); the document's first segment writes d initial.
Nothing per block is stored between forward and backward: only the start state of each segment
(none when a document is one item). No host synchronisation anywhere (see triton_plan.py). See
triton_scan.py for the scan itself and docs/kernels.md for why it is laid out this way."""

from __future__ import annotations

import torch
import triton

from .triton_combine import combine_kernel
from .triton_decode import triton_lightning_decode
from .triton_dkdv import dkdv_kernel
from .triton_jit import interpreted
from .triton_plan import _OVERRIDES, Plan, fused_enabled, make_plan, tile_config
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


def _tma_ok(device: torch.device, *tensors) -> bool:
    if interpreted(device):
        return True
    if torch.cuda.get_device_capability(device)[0] < 9:
        return False
    return all(t.data_ptr() % 16 == 0 for t in tensors)


def _desc(x: torch.Tensor, block_rows: int, block_cols: int):
    """A TMA descriptor over [N_tok, H, X] viewed as [N_tok, H * X]."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    n, h, d = x.shape
    return TensorDescriptor(x, [n, h * d], [h * d, 1], [block_rows, block_cols])


def _item_args(plan: Plan, dummy):
    return (plan.cu if plan.cu is not None else dummy,
            plan.items if plan.items is not None else dummy,
            plan.order if plan.order is not None else dummy)


def _scan(plan: Plan, slope, a, b, v, out, *, kind, block_size, s_in=None, s_in_t=False,
          sin_by_item=False, s_out=None, s_out_t=False, reverse=False, state_only=False):
    """One scan_kernel launch over all work items. a, b: [N_tok, H, DK]; v, out: [N_tok, H, DV];
    s_in / s_out: [rows, H, ., .] fp32 states (read / written transposed if *_t)."""
    n_tok, h, dk = b.shape
    dv = v.shape[-1]
    cfg = tile_config(kind, dk, dv, v.element_size(), v.device, block_size)
    grid = (plan.n_items * h * triton.cdiv(dv, cfg.block_v),)
    if grid[0] == 0 or n_tok == 0 and s_out is None:
        return
    dummy = v
    tma = cfg.tma and n_tok > 0 and _tma_ok(v.device, b, v, *(() if a is None else (a,)))
    if tma:
        b_arg, v_arg = _desc(b, cfg.block_t, cfg.block_k), _desc(v, cfg.block_t, cfg.block_v)
        a_arg = _desc(a, cfg.block_t, cfg.block_k) if a is not None else b_arg
    else:
        a_arg, b_arg, v_arg = (a if a is not None else dummy), b, v
    scan_kernel.at(v.device)[grid](
        a_arg, b_arg, v_arg, out if out is not None else dummy,
        s_in if s_in is not None else dummy, s_out if s_out is not None else dummy,
        *_item_args(plan, dummy), slope, h, plan.seq_len, n_tok, b.stride(0), v.stride(0),
        *_strides(s_in, s_in_t), *_strides(s_out, s_out_t), DK=dk, DV=dv,
        BLOCK_T=cfg.block_t, BLOCK_K=cfg.block_k, BLOCK_V=cfg.block_v,
        MODE=plan.mode, HAS_ORDER=plan.order is not None,
        REVERSE=int(reverse), STATE_ONLY=state_only, HAS_S_IN=s_in is not None,
        SIN_BY_ITEM=sin_by_item, STORE_S=s_out is not None, USE_TMA=tma, PREC=_prec(v.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _dkdv(plan: Plan, slope, q, k, v, do, dk, dv, *, block_size, s_in, sin_by_item, s_out):
    """The fused reverse scan: dk, dv and (first items) d initial state in one launch."""
    n_tok, h, d = q.shape
    e = v.shape[-1]
    cfg = tile_config("fused", d, e, v.element_size(), v.device, block_size)
    grid = (plan.n_items * h,)
    if grid[0] == 0:
        return
    dummy = v
    tma = cfg.tma and n_tok > 0 and _tma_ok(v.device, q, k, v, do)
    if tma:
        args = (_desc(q, cfg.block_t, cfg.block_k), _desc(k, cfg.block_t, cfg.block_k),
                _desc(v, cfg.block_t, cfg.block_v), _desc(do, cfg.block_t, cfg.block_v))
    else:
        args = (q, k, v, do)
    dkdv_kernel.at(v.device)[grid](
        *args, dk, dv, s_in if s_in is not None else dummy, s_out if s_out is not None else dummy,
        *_item_args(plan, dummy), slope, h, plan.seq_len, n_tok, q.stride(0), v.stride(0),
        *_strides(s_in), *_strides(s_out), DK=d, DV=e,
        BLOCK_T=cfg.block_t, BLOCK_K=cfg.block_k, BLOCK_V=cfg.block_v,
        MODE=plan.mode, HAS_ORDER=plan.order is not None, HAS_S_IN=s_in is not None,
        SIN_BY_ITEM=sin_by_item, STORE_S=s_out is not None, USE_TMA=tma, PREC=_prec(v.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _combine(plan: Plan, slope, buf, s0, reverse):
    """Local segment states in `buf` [n_items, H, DK, DV] -> start states (in place)."""
    _, h, dk, dv = buf.shape
    bk = min(64, max(16, triton.next_power_of_2(dk)))
    bv = min(64, max(16, triton.next_power_of_2(dv)))
    grid = (plan.n_docs * h * triton.cdiv(dk, bk) * triton.cdiv(dv, bv),)
    if grid[0] == 0:
        return
    combine_kernel.at(buf.device)[grid](
        buf, s0 if s0 is not None else buf, plan.items, plan.doc_first, slope, h, dk, dv,
        *_strides(s0), BLOCK_K=bk, BLOCK_V=bv, REVERSE=int(reverse), HAS_S0=s0 is not None,
        num_warps=4)


def _forward(plan, slope, q, k, v, s0, need_final, block_size):
    """q, k: [N_tok, H, D]; v: [N_tok, H, E]. Returns (o, final or None, start states or None)."""
    n_tok, h, d = q.shape
    e = v.shape[-1]
    o = torch.empty(n_tok, h, e, dtype=q.dtype, device=q.device)
    final = (torch.empty(plan.n_docs, h, d, e, dtype=torch.float32, device=q.device)
             if need_final else None)
    if not plan.segmented:
        _scan(plan, slope, q, k, v, o, kind="fwd", block_size=block_size, s_in=s0, s_out=final)
        return o, final, None
    starts = torch.empty(plan.n_items, h, d, e, dtype=torch.float32, device=q.device)
    _scan(plan, slope, None, k, v, None, kind="state", block_size=block_size, s_out=starts,
          state_only=True)
    _combine(plan, slope, starts, s0, reverse=False)
    _scan(plan, slope, q, k, v, o, kind="fwd", block_size=block_size, s_in=starts,
          sin_by_item=True, s_out=final)
    return o, final, starts


def _backward(fwd_plan, rev_plan, fused, slope, q, k, v, s0, starts, do, dsf, need, block_size):
    """Gradients (dq, dk, dv, ds0) of the flattened problem; `need` flags which are wanted."""
    n_tok, h, d = q.shape
    e = v.shape[-1]
    dq = dk = dv = ds0 = None
    if need[0]:
        dq = torch.empty_like(q)
        if fwd_plan.segmented:
            _scan(fwd_plan, slope, do, v, k, dq, kind="dq", block_size=block_size, s_in=starts,
                  s_in_t=True, sin_by_item=True)
        else:
            _scan(fwd_plan, slope, do, v, k, dq, kind="dq", block_size=block_size, s_in=s0,
                  s_in_t=True)
    if not (need[1] or need[2] or need[3]):
        return dq, dk, dv, ds0
    plan = rev_plan
    if need[3]:
        ds0 = torch.empty(plan.n_docs, h, d, e, dtype=torch.float32, device=q.device)
    if plan.segmented:
        rev = torch.empty(plan.n_items, h, d, e, dtype=torch.float32, device=q.device)
        _scan(plan, slope, None, q, do, None, kind="state", block_size=block_size, s_out=rev,
              reverse=True, state_only=True)
        _combine(plan, slope, rev, dsf, reverse=True)
        by_item = True
    else:
        rev, by_item = dsf, False
    if fused:
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        _dkdv(plan, slope, q, k, v, do, dk, dv, block_size=block_size, s_in=rev,
              sin_by_item=by_item, s_out=ds0)
        return dq, (dk if need[1] else None), (dv if need[2] else None), ds0
    # the first reverse pass that runs writes d initial state (transposed for the dk pass)
    if need[2] or not need[1]:
        dv = torch.empty_like(v)
        _scan(plan, slope, k, q, do, dv, kind="rev", block_size=block_size, s_in=rev,
              sin_by_item=by_item, reverse=True, s_out=ds0)
        ds0_pending = False
    else:
        ds0_pending = ds0 is not None
    if need[1]:
        dk = torch.empty_like(k)
        _scan(plan, slope, v, do, q, dk, kind="rev", block_size=block_size, s_in=rev,
              s_in_t=True, sin_by_item=by_item, reverse=True,
              s_out=ds0 if ds0_pending else None, s_out_t=True)
    return dq, dk, (dv if need[2] else None), ds0


class _LightningTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slope, s0, plans, need_final, block_size):
        b, t, h, d = q.shape
        e = v.shape[-1]
        q3, k3, v3 = (x.reshape(b * t, h, x.shape[-1]) for x in (q, k, v))
        fwd_plan = plans[0]
        o, final, starts = _forward(fwd_plan, slope, q3, k3, v3, s0, need_final, block_size)
        ctx.save_for_backward(q3, k3, v3, slope, s0, starts)
        ctx.plans = plans
        ctx.block_size = block_size
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
        fwd_plan, rev_plan_fn, fused = ctx.plans
        rev_plan = rev_plan_fn() if (need[1] or need[2] or need[3]) else None
        dq, dk, dv, ds0 = _backward(fwd_plan, rev_plan, fused, slope, q3, k3, v3, s0, starts, do3, dsf,
                                    need, ctx.block_size)
        dq = dq.view(b, t, h, d) if dq is not None else None
        dk = dk.view(b, t, h, d) if dk is not None else None
        dv = dv.view(b, t, h, e) if dv is not None else None
        return dq, dk, dv, None, ds0, None, None, None


def triton_lightning_attn(q, k, v, slope, initial_state=None, cu_seqlens=None, block_size=None,
                          output_final_state=False, max_seqlen=None):
    """Lightning attention on Triton kernels; inputs already validated by `lightning_attn`.

    Returns (o [B, T, H, E] in q.dtype, final state [N, H, D, E] fp32 or None). Differentiable
    in q, k, v and initial_state (including through the final state); not in slope."""
    if q.dtype not in _DTYPES:
        raise TypeError(f"the triton backend takes fp16, bf16 or fp32 inputs, got {q.dtype}")
    if q.dtype == torch.bfloat16 and interpreted(q.device):
        # Triton 3.9's interpreter does bf16 arithmetic on the raw 16-bit patterns; run the same
        # kernels in fp32 there and round the output (fp16 keeps the half-precision code path)
        o, final = triton_lightning_attn(q.float(), k.float(), v.float(), slope, initial_state,
                                         cu_seqlens, block_size, output_final_state, max_seqlen)
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
    dev = q.device
    n_vt = triton.cdiv(e, tile_config("fwd", d, e, q.element_size(), dev, block_size).block_v)
    plan_kw = dict(batch=b, seq=t, heads=h, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    fwd_plan = make_plan(dev, n_value_tiles=n_vt, **plan_kw)
    fused = fused_enabled(dev, d, e)
    n_vt_rev = 1 if fused else triton.cdiv(
        e, tile_config("rev", d, e, q.element_size(), dev, block_size).block_v)
    overrides = dict(_OVERRIDES)

    def rev_plan():
        """The reverse passes' items, built when the backward runs (with the forward's
        overrides, which a benchmark may have left by then)."""
        if n_vt_rev == n_vt and not fused:
            return fwd_plan
        old = dict(_OVERRIDES)
        _OVERRIDES.update(overrides)
        try:
            return make_plan(dev, n_value_tiles=n_vt_rev, fused=fused, **plan_kw)
        finally:
            _OVERRIDES.clear()
            _OVERRIDES.update(old)

    return _LightningTriton.apply(q, k, v, slope, s0, (fwd_plan, rev_plan, fused),
                                  bool(output_final_state), block_size)
