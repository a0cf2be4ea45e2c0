"""LASP+ (MiniMax-01 §3.2): lightning attention with the sequence split over a CP group.

Lightning attention is a linear recurrence S_t = lambda*S_{t-1} + k_t^T v_t, so a rank only
needs the state at the start of its slice. Each rank

1. computes the d x d state its own slice contributes to the end of the slice (zero initial
   state, only the last document piece of the slice: an earlier piece ends inside the slice);
2. all-gathers these states (one collective, all lightning heads at once);
3. combines the states of the ranks before it: the incoming state of rank r is
   S_{r-1} + lambda^{T_l} * incoming(r-1) while the document keeps running through whole slices,
   and restarts at 0 where a document starts at a slice boundary;
4. runs the single-device op on its slice with that incoming state as the initial state of its
   first document.

Backward is autograd: the all-gather's adjoint is one reduce-scatter of state gradients, the
rest is the single-device op's backward (which gives gradients for the initial state)."""

from __future__ import annotations

import torch

from ..ops import lightning_attn
from ..ops.lightning.common import compute_dtype
from .collectives import all_gather
from .context import CPContext, CPGroup, cp_context


def lasp_plan(ctx: CPContext):
    """Per rank j: does its first token continue a document (cont), and does one document run
    through the whole slice (through). Plus this rank's last document piece start (local)."""
    n = ctx.local_len
    cont = [j > 0 and ctx.doc_start_at_or_before(j * n) < j * n for j in range(ctx.size)]
    through = [cont[j] and not ctx.has_start_in(j * n + 1, (j + 1) * n) for j in range(ctx.size)]
    last = ctx.doc_start_at_or_before((ctx.rank + 1) * n - 1)
    return cont, through, max(last - ctx.rank * n, 0)


def slice_state(k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor, start: int) -> torch.Tensor:
    """Sum over t in [start, T) of lambda^(T-1-t) k_t^T v_t: [B, H, D, E] in the compute dtype."""
    dt = compute_dtype(k)
    t = k.shape[1]
    dist_to_end = torch.arange(t - start - 1, -1, -1, device=k.device, dtype=dt)
    decay = torch.exp(-slope.to(dt)[None, :] * dist_to_end[:, None])  # [n, H]
    kd = k[:, start:].to(dt) * decay[None, :, :, None]
    return torch.einsum("bthd,bthe->bhde", kd, v[:, start:].to(dt))


def incoming_state(states: torch.Tensor, slope: torch.Tensor, cont, through, rank: int,
                   local_len: int):
    """The state at the start of `rank`'s slice from the gathered slice states [C, B, H, D, E]
    (None when the rank starts a fresh document). incoming(j) = S_{j-1} + lambda^{T_l} *
    incoming(j-1) while a document runs through whole slices."""
    if not cont[rank]:
        return None
    block_decay = torch.exp(-slope.to(states.dtype) * local_len)[None, :, None, None]
    j0 = max(j for j in range(rank + 1) if not cont[j])  # the document's chain starts on j0
    incoming = None
    for j in range(j0 + 1, rank + 1):
        prev = states[j - 1]
        incoming = prev + block_decay * incoming if (incoming is not None and through[j - 1]) \
            else prev
    return incoming


def lasp_lightning_attn(q, k, v, slope, *, cu_seqlens=None, ctx: CPContext, backend=None,
                        block_size=None):
    """Drop-in `LightningAttention.attn_fn` under CP. q, k, v: this rank's slice [B, T_l, H, D];
    `cu_seqlens`: the local document offsets (B == 1). Returns (o, None)."""
    cont, through, last = ctx.cached("lasp", lambda: lasp_plan(ctx))
    states = all_gather(slice_state(k, v, slope, last), ctx.group)  # [C, B, H, D, E]
    initial = incoming_state(states, slope, cont, through, ctx.rank, ctx.local_len)
    if initial is not None and cu_seqlens is not None and cu_seqlens.numel() > 2:
        rest = initial.new_zeros((cu_seqlens.numel() - 2,) + tuple(initial.shape[1:]))
        initial = torch.cat([initial, rest], 0)
    o, _ = lightning_attn(q, k, v, slope, initial_state=initial, cu_seqlens=cu_seqlens,
                          block_size=block_size, backend=backend)
    if initial is None:  # keep the gather in this rank's graph: its backward is a collective
        o = o + (states.sum() * 0).to(o.dtype)
    return o, None


class LaspAttention:
    """`LightningAttention.attn_fn` under CP: LASP+ over the CP group, the document structure
    read from the forward's AttnContext (`cp_context`)."""

    def __init__(self, cp: CPGroup, backend=None):
        self.cp, self.backend = cp, backend

    def __call__(self, q, k, v, slope, ctx):
        o, _ = lasp_lightning_attn(q, k, v, slope, cu_seqlens=ctx.cu_seqlens,
                                   ctx=cp_context(ctx, self.cp), backend=self.backend)
        return o
