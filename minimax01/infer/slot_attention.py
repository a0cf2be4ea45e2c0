"""Softmax attention of packed queries against a slot pool's KV cache (SPEC §4, §7).

The serving engine keeps post-RoPE keys and values per slot, `[S, Hkv, L, D]`. A step hands in
packed queries `[T, H, D]` grouped in documents; document `n` belongs to slot `slot[n]`, has
`qlen[n]` queries whose first sits at absolute position `ctx[n]` (tokens cached before this
step), and its keys are already written to the cache. Query at position `p` sees keys `0..p` of its
own slot: one rule for a prefill chunk (many queries, any prefix) and a decode step (one query).

Two implementations compute the same thing: `torch_slot_attention` (any device; a loop over
documents, the CPU path and the reference) and `triton_slot_attention` (one launch for the whole
batch, split over the keys for long contexts so one decode query still fills the GPU; no host
synchronisation, so a decode step can be captured in a CUDA graph)."""


import math
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path still works
    triton = None


def torch_slot_attention(q, keys, values, slot, ctx, qlen, scale):
    """Reference. q: [T, H, D]; keys, values: [S, Hkv, L, D]; slot, ctx, qlen: [N] ints (lists
    or tensors). Returns o [T, H, D]."""
    slot, ctx, qlen = (x.tolist() if torch.is_tensor(x) else list(x) for x in (slot, ctx, qlen))
    out = torch.empty_like(q)
    h, hkv = q.shape[1], keys.shape[1]
    start = 0
    for s, c, n in zip(slot, ctx, qlen):
        if n == 0:
            continue
        qd = q[start:start + n].transpose(0, 1)[None]       # [1, H, n, D]
        k = keys[s, :, :c + n][None]                          # [1, Hkv, c+n, D] (a view)
        v = values[s, :, :c + n][None]
        if hkv != h:
            k = k.repeat_interleave(h // hkv, dim=1)
            v = v.repeat_interleave(h // hkv, dim=1)
        qpos = torch.arange(c, c + n, device=q.device)
        mask = torch.arange(c + n, device=q.device)[None, :] <= qpos[:, None]
        o = F.scaled_dot_product_attention(qd, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                           scale=scale)
        out[start:start + n] = o[0].transpose(0, 1)
        start += n
    return out


# --------------------------------------------------------------------------- Triton
def _slot_attn_fwd(Q, K, V, O, Mp, Lp, Ap, work_doc, work_q, doc_slot, doc_qoff, doc_qlen,
                   doc_ctx, scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_ks,
                   stride_kh, stride_kl, stride_vs, stride_vh, stride_vl, num_tokens,
                   G: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr,
                   BLOCK_N: tl.constexpr, D: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """One program: BLOCK_M queries of one document x the G query heads of one KV head (rows =
    query-major, head-minor), over one of NUM_SPLITS ranges of the visible keys."""
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    doc = tl.load(work_doc + pid)
    q0 = tl.load(work_q + pid)
    slot = tl.load(doc_slot + doc).to(tl.int64)
    qoff = tl.load(doc_qoff + doc)
    qlen = tl.load(doc_qlen + doc)
    ctx = tl.load(doc_ctx + doc)

    r = tl.arange(0, ROWS)
    i = r // G
    head = kvh * G + r % G
    row_ok = (r < BLOCK_M * G) & (q0 + i < qlen)
    tok = (qoff + q0 + i).to(tl.int64)
    d = tl.arange(0, D)
    q = tl.load(Q + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)
    pos = ctx + q0 + i
    kv_end = ctx + tl.minimum(q0 + BLOCK_M, qlen)  # keys seen by the last query of the block
    per = ((kv_end + NUM_SPLITS - 1) // NUM_SPLITS + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    lo = split * per
    hi = tl.minimum(lo + per, kv_end)

    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, D], dtype=tl.float32)
    k_base = K + slot * stride_ks + kvh * stride_kh
    v_base = V + slot * stride_vs + kvh * stride_vh
    qk_scale = scale * 1.4426950408889634  # exp(x) = exp2(x * log2 e)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        k = tl.load(k_base + n[None, :].to(tl.int64) * stride_kl + d[:, None], mask=n_ok[None, :],
                    other=0.0)
        s = tl.dot(q, k.to(q.dtype)) * qk_scale
        s = tl.where((n[None, :] <= pos[:, None]) & n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + n[:, None].to(tl.int64) * stride_vl + d[None, :], mask=n_ok[:, None],
                    other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if NUM_SPLITS == 1:
        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(O + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 o.to(O.dtype.element_ty), mask=row_ok[:, None])
    else:  # partial results [NUM_SPLITS, T, H, (D)], merged by _merge_splits
        h_total = G * tl.num_programs(1)
        row = (split * num_tokens + tok) * h_total + head
        tl.store(Mp + row, m_i, mask=row_ok)
        tl.store(Lp + row, l_i, mask=row_ok)
        tl.store(Ap + row[:, None] * D + d[None, :], acc, mask=row_ok[:, None])


class _Kernel:
    """Compiled on CUDA, interpreted for CPU tensors (tests). triton.jit fixes the mode from
    TRITON_INTERPRET when it decorates, so both forms are built lazily from the plain function."""

    def __init__(self, fn):
        self.fn, self._compiled, self._interpreted = fn, None, None

    def at(self, device: torch.device):
        if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
            if self._interpreted is None:
                from triton.runtime.interpreter import InterpretedFunction

                self._interpreted = InterpretedFunction(self.fn)
            return _Interpreted(self._interpreted)
        if self._compiled is None:
            from triton.runtime.jit import JITFunction

            self._compiled = JITFunction(self.fn)
        return self._compiled


class _Interpreted:
    """Launch an interpreted kernel with triton.language's own jit helpers (tl.zeros, ...)
    interpreted too for the duration of the launch."""

    _helpers: dict = {}

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            from triton.runtime.interpreter import InterpretedFunction
            from triton.runtime.jit import JITFunction

            original = JITFunction.__call__

            def call(jit_fn, *a, **kw):
                if jit_fn.fn not in self._helpers:
                    self._helpers[jit_fn.fn] = InterpretedFunction(jit_fn.fn)
                return self._helpers[jit_fn.fn](*a, **kw)

            JITFunction.__call__ = call
            try:
                return self.fn[grid](*args, **kwargs)
            finally:
                JITFunction.__call__ = original

        return launch


_KERNEL = _Kernel(_slot_attn_fwd) if triton is not None else None


def triton_supported(q: torch.Tensor, keys: torch.Tensor) -> bool:
    d = q.shape[-1]
    return (_KERNEL is not None and d >= 16 and d & (d - 1) == 0 and q.dtype == keys.dtype
            and keys.stride(-1) == 1 and q.stride(-1) == 1)


def _merge_splits(m, lse_l, acc, out_dtype):
    """Combine per-split softmax partials: m, l [NS, T, H], acc [NS, T, H, D]."""
    top = m.max(0).values
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    w = torch.exp2(m - top)
    denom = (w * lse_l).sum(0)
    o = (w[..., None] * acc).sum(0) / torch.where(denom == 0, torch.ones_like(denom), denom)[..., None]
    return o.to(out_dtype)


def decode_splits(batch: int, kv_heads: int, max_context: int, sms: int = 132) -> int:
    """Key-range splits for a decode launch: enough programs for ~2 waves, none shorter than 256
    keys. Fixed per batch size so a captured CUDA graph stays valid at every length."""
    want = max(1, math.ceil(2 * sms / max(batch * kv_heads, 1)))
    return int(max(1, min(want, math.ceil(max_context / 256), 64)))


def triton_slot_attention(q, keys, values, slot, ctx, qlen, scale, *, work=None, block_m=None,
                          num_splits=1, block_n=None):
    """q: [T, H, D]; keys, values: [S, Hkv, L, D]; slot, ctx, qlen: [N] int32 device tensors.
    `work` = (work_doc, work_q) [P] int32: the program list (document, first query); built here
    from host lengths when None. `block_m` queries per program (1 for decode)."""
    t, h, d = q.shape
    hkv = keys.shape[1]
    g = h // hkv
    if block_m is None:
        block_m = max(1, 64 // g) if t > len(slot) else 1
    rows = max(16, triton.next_power_of_2(block_m * g))
    if work is None:
        lens = qlen.tolist()
        docs, firsts = [], []
        for n, length in enumerate(lens):
            for q0 in range(0, length, block_m):
                docs.append(n)
                firsts.append(q0)
        work = (torch.tensor(docs, dtype=torch.int32, device=q.device),
                torch.tensor(firsts, dtype=torch.int32, device=q.device))
    work_doc, work_q = work
    programs = work_doc.shape[0]
    qoff = torch.cumsum(qlen, 0, dtype=torch.int32) - qlen
    o = torch.empty_like(q)
    if num_splits > 1:
        mp = torch.empty(num_splits, t, h, device=q.device, dtype=torch.float32)
        lp = torch.empty_like(mp)
        ap = torch.empty(num_splits, t, h, d, device=q.device, dtype=torch.float32)
    else:
        mp = lp = ap = o
    if block_n is None:
        block_n = 64 if q.is_cuda else 16
    if programs:
        _KERNEL.at(q.device)[(programs, hkv, num_splits)](
            q, keys, values, o, mp, lp, ap, work_doc, work_q, slot, qoff, qlen, ctx, float(scale),
            q.stride(0), q.stride(1), o.stride(0), o.stride(1),
            keys.stride(0), keys.stride(1), keys.stride(2),
            values.stride(0), values.stride(1), values.stride(2), t,
            G=g, BLOCK_M=block_m, ROWS=rows, BLOCK_N=block_n, D=d, NUM_SPLITS=num_splits,
            **({"num_warps": 8 if rows >= 64 else 4, "num_stages": 2} if q.is_cuda else {}))
    if num_splits > 1:
        return _merge_splits(mp, lp, ap, q.dtype)
    return o
