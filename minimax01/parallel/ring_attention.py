"""Varlen ring attention for the softmax layers under context parallelism.

Every rank keeps its queries; key/value blocks travel around the CP ring (one send and one
receive per step, overlapped with the current step's compute). Each step computes the pieces of
causal, document-masked attention between the local queries and the visiting keys, and merges
them into the running output with the log-sum-exp rule. Backward runs the ring again: dq stays
home, dk/dv accumulate (fp32) while travelling with their block and return to its owner.

Load balance. With contiguous slices, rank c would do c+1 blocks of causal work. When the local
length is even, the attention function first moves the queries/keys/values into the "zigzag"
layout with one all-to-all (rank r holds chunks r and 2C-1-r of 2C equal chunks), so every rank
does the same work, and moves the output back afterwards. The rest of the model (LASP+, MoE)
keeps the contiguous slices.

Documents. Inside a chunk the pieces are causal per document; between an earlier key chunk and a
later query chunk only one document can connect them (the last one of the key chunk, if it runs
on to the first one of the query chunk), so that piece is one dense rectangle.

`allgather_attention` is the simple reference: gather all K/V, mask, attend."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .block_attention import make_kernel
from .collectives import all_gather, all_to_all, ring_exchange, wait_all
from .context import CPContext, CPGroup, cp_context


# ---------------------------------------------------------------------- plan
def _chunks(ctx: CPContext, rank: int, balanced: bool) -> list[int]:
    return [rank, 2 * ctx.size - 1 - rank] if balanced else [rank]


def ring_plan(ctx: CPContext, balanced: bool) -> list[list[tuple]]:
    """For every ring step s (visiting block of rank (r - s) mod C), the pieces to compute:
    (q_lo, q_hi, k_lo, k_hi, segments or None), indices local to the rank's tensors."""
    n_chunks = 2 * ctx.size if balanced else ctx.size
    chunk = ctx.total_len // n_chunks
    mine = _chunks(ctx, ctx.rank, balanced)
    steps = []
    for s in range(ctx.size):
        src = (ctx.rank - s) % ctx.size
        items = []
        for qi, a in enumerate(mine):
            for ki, b in enumerate(_chunks(ctx, src, balanced)):
                q0, k0 = qi * chunk, ki * chunk  # local offsets of the two chunks
                if a == b:
                    segs = [(x - a * chunk, y - a * chunk)
                            for x, y in ctx.segments(a * chunk, (a + 1) * chunk)]
                    items.append((q0, q0 + chunk, k0, k0 + chunk, segs))
                elif a > b:
                    k_last = (b + 1) * chunk - 1
                    doc = ctx.doc_start_at_or_before(k_last)
                    if ctx.doc_start_at_or_before(a * chunk) != doc:
                        continue  # no document connects the two chunks
                    q_end = ctx.next_start_after(a * chunk, (a + 1) * chunk) - a * chunk
                    k_start = max(doc, b * chunk) - b * chunk
                    items.append((q0, q0 + q_end, k0 + k_start, k0 + chunk, None))
        steps.append(items)
    return steps


# ---------------------------------------------------------------------- ring (autograd)
def _expand(x: torch.Tensor, rep: int) -> torch.Tensor:
    return x if rep == 1 else x.repeat_interleave(rep, dim=2)


def _fold(dx: torch.Tensor, rep: int) -> torch.Tensor:
    """Sum the gradients of repeated KV heads back onto the KV heads."""
    if rep == 1:
        return dx
    b, t, h, d = dx.shape
    return dx.view(b, t, h // rep, rep, d).sum(3)


def _merge(o_acc, lse_acc, lo, hi, o_blk, lse_blk):
    old = lse_acc[:, :, lo:hi]
    new = torch.logaddexp(old, lse_blk)
    w_old = torch.exp(old - new).transpose(1, 2)[..., None]
    w_blk = torch.exp(lse_blk - new).transpose(1, 2)[..., None]
    o_acc[:, lo:hi] = o_acc[:, lo:hi] * w_old + o_blk.to(o_acc.dtype) * w_blk
    lse_acc[:, :, lo:hi] = new


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, plan, group, kernel):
        rep = q.shape[2] // k.shape[2]
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        o_acc = torch.zeros(q.shape, dtype=acc, device=q.device)
        lse_acc = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=acc,
                             device=q.device)
        cur = torch.stack([k, v])
        for s, items in enumerate(plan):
            nxt, reqs = ring_exchange(cur, group) if s < len(plan) - 1 else (None, None)
            if items:
                kk, vv = _expand(cur[0], rep), _expand(cur[1], rep)
                for qa, qb, ka, kb, segs in items:
                    o_b, lse_b = kernel.forward(q[:, qa:qb], kk[:, ka:kb], vv[:, ka:kb], scale, segs)
                    _merge(o_acc, lse_acc, qa, qb, o_b, lse_b.to(acc))
            wait_all(reqs)
            cur = nxt if nxt is not None else cur
        out = o_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse_acc)
        ctx.scale, ctx.plan, ctx.group, ctx.kernel = scale, plan, group, kernel
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        plan, group, kernel, scale = ctx.plan, ctx.group, ctx.kernel, ctx.scale
        rep = q.shape[2] // k.shape[2]
        acc = lse.dtype
        do = do.contiguous()
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        cur = torch.stack([k, v])
        incoming, acc_reqs = None, None
        for s, items in enumerate(plan):
            nxt, kv_reqs = ring_exchange(cur, group) if s < len(plan) - 1 else (None, None)
            part = torch.zeros(cur.shape, dtype=acc, device=q.device)
            if items:
                kk, vv = _expand(cur[0], rep), _expand(cur[1], rep)
                for qa, qb, ka, kb, segs in items:
                    dq_b, dk_b, dv_b = kernel.backward(do[:, qa:qb], q[:, qa:qb], kk[:, ka:kb],
                                                       vv[:, ka:kb], out[:, qa:qb],
                                                       lse[:, :, qa:qb], scale, segs)
                    dq[:, qa:qb] += dq_b.to(acc)
                    part[0, :, ka:kb] += _fold(dk_b.to(acc), rep)
                    part[1, :, ka:kb] += _fold(dv_b.to(acc), rep)
            if s > 0:  # the gradient this block gathered on the ranks it visited before
                wait_all(acc_reqs)
                part += incoming
            incoming, acc_reqs = ring_exchange(part, group)
            wait_all(kv_reqs)
            cur = nxt if nxt is not None else cur
        wait_all(acc_reqs)  # after a full turn each block's gradient is back home
        return dq.to(q.dtype), incoming[0].to(k.dtype), incoming[1].to(v.dtype), None, None, None, None


# ---------------------------------------------------------------------- zigzag layout
def _zigzag_splits(ctx: CPContext):
    """all-to-all splits (in chunks) that move contiguous chunks (2r, 2r+1) to their zigzag
    owners, and the order the two local chunks must be sent in."""
    c, r = ctx.size, ctx.rank
    owner = lambda x: x if x < c else 2 * c - 1 - x  # noqa: E731
    send = sorted([2 * r, 2 * r + 1], key=owner)
    in_splits = [sum(owner(x) == d for x in send) for d in range(c)]
    held = [r, 2 * c - 1 - r]
    out_splits = [sum(x // 2 == src for x in held) for src in range(c)]
    return send, in_splits, out_splits


def _seq_all_to_all(x, out_splits, in_splits, group):
    """all-to-all along dim 1 (time) of a [B, T, ...] tensor; splits in rows of time."""
    y = all_to_all(x.transpose(0, 1).contiguous(), out_splits, in_splits, group)
    return y.transpose(0, 1)


def to_zigzag(x: torch.Tensor, ctx: CPContext) -> torch.Tensor:
    send, in_splits, out_splits = _zigzag_splits(ctx)
    half = x.shape[1] // 2
    if send[0] != 2 * ctx.rank:
        x = torch.cat([x[:, half:], x[:, :half]], 1)
    return _seq_all_to_all(x, [n * half for n in out_splits], [n * half for n in in_splits],
                           ctx.group)


def from_zigzag(x: torch.Tensor, ctx: CPContext) -> torch.Tensor:
    send, in_splits, out_splits = _zigzag_splits(ctx)
    half = x.shape[1] // 2
    y = _seq_all_to_all(x, [n * half for n in in_splits], [n * half for n in out_splits],
                        ctx.group)
    if send[0] != 2 * ctx.rank:
        y = torch.cat([y[:, half:], y[:, :half]], 1)
    return y


# ---------------------------------------------------------------------- entry points
def ring_attention(q, k, v, *, ctx: CPContext, scale: float, kernel: str = "auto",
                   balance: bool = True) -> torch.Tensor:
    """Causal document-masked attention of this rank's slice against the whole sequence.
    q: [B, T_l, H, D]; k, v: [B, T_l, Hkv, D] (GQA). Returns [B, T_l, H, D]."""
    balanced = balance and ctx.local_len % 2 == 0 and ctx.size > 1
    plan = ctx.cached(("ring", balanced), lambda: ring_plan(ctx, balanced))
    impl = make_kernel(kernel, q)
    if not balanced:
        return _Ring.apply(q, k, v, scale, plan, ctx.group, impl)
    h, hkv = q.shape[2], k.shape[2]
    qkv = to_zigzag(torch.cat([q, k, v], dim=2), ctx)
    qz, kz, vz = qkv.split([h, hkv, hkv], dim=2)
    o = _Ring.apply(qz.contiguous(), kz.contiguous(), vz.contiguous(), scale, plan, ctx.group,
                    impl)
    return from_zigzag(o, ctx)


def allgather_attention(q, k, v, *, ctx: CPContext, scale: float) -> torch.Tensor:
    """Reference: all-gather K/V, build the causal document mask, plain SDPA."""
    b, t, h, _ = q.shape
    def full(x):
        return all_gather(x, ctx.group).permute(1, 0, 2, 3, 4).reshape(b, ctx.total_len,
                                                                        *x.shape[2:])
    kf, vf = full(k), full(v)
    doc = torch.zeros(ctx.total_len, dtype=torch.long)
    doc[ctx.starts] = 1
    doc = (doc.cumsum(0) - 1).to(q.device)
    qpos = torch.arange(ctx.rank * t, (ctx.rank + 1) * t, device=q.device)
    kpos = torch.arange(ctx.total_len, device=q.device)
    mask = (kpos[None, :] <= qpos[:, None]) & (doc[kpos][None, :] == doc[qpos][:, None])
    rep = h // k.shape[2]
    o = F.scaled_dot_product_attention(q.transpose(1, 2), _expand(kf, rep).transpose(1, 2),
                                       _expand(vf, rep).transpose(1, 2), attn_mask=mask,
                                       scale=scale)
    return o.transpose(1, 2)


class RingAttention:
    """`SoftmaxAttention.attn_fn` under CP; the document structure comes from the forward's
    AttnContext (`cp_context`). `mode` "ring" (default) or "allgather"."""

    def __init__(self, cp: CPGroup, mode: str = "ring", kernel: str = "auto", balance: bool = True):
        if mode not in ("ring", "allgather"):
            raise ValueError(f"unknown context-parallel attention {mode!r}; use ring or allgather")
        self.cp, self.mode, self.kernel, self.balance = cp, mode, kernel, balance

    def __call__(self, q, k, v, ctx, scale=None):
        plan = cp_context(ctx, self.cp)
        scale = scale if scale is not None else q.shape[-1] ** -0.5
        if self.mode == "allgather":
            return allgather_attention(q, k, v, ctx=plan, scale=scale)
        return ring_attention(q, k, v, ctx=plan, scale=scale, kernel=self.kernel,
                              balance=self.balance)
