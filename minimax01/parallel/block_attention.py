"""Per-block softmax attention that returns the log-sum-exp, for ring attention.

A kernel computes one (query block, key block) piece of causal attention and its row
log-sum-exp, so pieces can be merged exactly; its backward takes the *merged* output and lse
(the probabilities of a piece are exp(s - lse_global)), the standard ring / flash-attention
backward. A piece is either a full rectangle (`segments=None`: every query sees every key) or
the diagonal of a chunk (`segments=[(a, b), ...]`: causal attention inside each document piece
[a, b), nothing across pieces).

Tensors are [B, T, H, D] with K/V already repeated to the query heads. Kernels:
  "math"  plain PyTorch (any device and dtype, fp64 for tests; memory grows with Tq*Tk);
  "flash" torch's fused flash attention ops with logsumexp (CUDA, fp16/bf16);
  "cpu_flash" torch's fused CPU flash ops (checks the fused protocol on the CPU)."""

from __future__ import annotations

import torch

aten = torch.ops.aten


def _causal_segment_mask(tq: int, segments, device) -> torch.Tensor:
    doc = torch.empty(tq, dtype=torch.long, device=device)
    for i, (a, b) in enumerate(segments):
        doc[a:b] = i
    idx = torch.arange(tq, device=device)
    return (idx[None, :] <= idx[:, None]) & (doc[None, :] == doc[:, None])


class MathKernel:
    name = "math"

    def _scores(self, q, k, scale, segments):
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        s = torch.einsum("bqhd,bkhd->bhqk", q.to(dt), k.to(dt)) * scale
        if segments is not None:
            mask = _causal_segment_mask(q.shape[1], segments, q.device)
            s = s.masked_fill(~mask, float("-inf"))
        return s

    def forward(self, q, k, v, scale, segments):
        s = self._scores(q, k, scale, segments)
        lse = torch.logsumexp(s, dim=-1)  # [B, H, Tq]
        p = torch.exp(s - lse[..., None])
        o = torch.einsum("bhqk,bkhd->bqhd", p, v.to(s.dtype))
        return o, lse

    def backward(self, do, q, k, v, o, lse, scale, segments):
        s = self._scores(q, k, scale, segments)
        dt = s.dtype
        p = torch.exp(s - lse.to(dt)[..., None])
        do_, v_ = do.to(dt), v.to(dt)
        dv = torch.einsum("bhqk,bqhd->bkhd", p, do_)
        dp = torch.einsum("bqhd,bkhd->bhqk", do_, v_)
        delta = (do_ * o.to(dt)).sum(-1).transpose(1, 2)  # [B, H, Tq]
        ds = p * (dp - delta[..., None])
        dq = torch.einsum("bhqk,bkhd->bqhd", ds, k.to(dt)) * scale
        dk = torch.einsum("bhqk,bqhd->bkhd", ds, q.to(dt)) * scale
        return dq, dk, dv


class _FusedKernel:
    """Shared loop over document pieces for the fused ops (one call per piece)."""

    def forward(self, q, k, v, scale, segments):
        if segments is None:
            return self._fwd(q, k, v, scale, False)
        if len(segments) == 1:
            return self._fwd(q, k, v, scale, True)
        o = torch.empty_like(q)
        lse = q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)
        for a, b in segments:
            o[:, a:b], lse[:, :, a:b] = self._fwd(q[:, a:b], k[:, a:b], v[:, a:b], scale, True)
        return o, lse

    def backward(self, do, q, k, v, o, lse, scale, segments):
        if segments is None or len(segments) == 1:
            return self._bwd(do, q, k, v, o, lse, scale, segments is not None)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for a, b in segments:
            dq[:, a:b], dk[:, a:b], dv[:, a:b] = self._bwd(
                do[:, a:b], q[:, a:b], k[:, a:b], v[:, a:b], o[:, a:b], lse[:, :, a:b], scale, True)
        return dq, dk, dv


class FlashKernel(_FusedKernel):
    """aten::_scaled_dot_product_flash_attention and its backward (CUDA, fp16/bf16)."""

    name = "flash"

    def _fwd(self, q, k, v, scale, causal):
        out = aten._scaled_dot_product_flash_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, False,
            scale=scale)
        self._aux = out[2:4] + out[6:8]  # cum_seq_q, cum_seq_k, rng state: reused by backward
        return out[0].transpose(1, 2), out[1][..., :q.shape[1]]

    def _bwd(self, do, q, k, v, o, lse, scale, causal):
        if not hasattr(self, "_aux"):  # the backward needs the op's bookkeeping outputs once
            self._fwd(q[:, :1], k[:, :1], v[:, :1], scale, False)
        cq, ck, seed, offset = self._aux
        t = lambda x: x.transpose(1, 2)  # noqa: E731
        dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
            t(do).contiguous(), t(q), t(k), t(v), t(o).contiguous(), lse.contiguous(), cq, ck,
            q.shape[1], k.shape[1], 0.0, causal, seed, offset, scale=scale)
        return t(dq), t(dk), t(dv)


class CpuFlashKernel(_FusedKernel):
    """aten::_scaled_dot_product_flash_attention_for_cpu and its backward."""

    name = "cpu_flash"

    def _fwd(self, q, k, v, scale, causal):
        o, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, scale=scale)
        return o.transpose(1, 2), lse.float()

    def _bwd(self, do, q, k, v, o, lse, scale, causal):
        t = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731
        dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            t(do), t(q), t(k), t(v), t(o), lse.contiguous(), 0.0, causal, scale=scale)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


KERNELS = {"math": MathKernel, "flash": FlashKernel, "cpu_flash": CpuFlashKernel}


def make_kernel(name: str, q: torch.Tensor):
    """`name` "auto" picks flash on CUDA for fp16/bf16 with head dim <= 256, else math."""
    if name == "auto":
        fused = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
        name = "flash" if fused else "math"
    if name not in KERNELS:
        raise ValueError(f"unknown ring attention kernel {name!r}; choose from auto, "
                         f"{', '.join(KERNELS)}")
    return KERNELS[name]()
