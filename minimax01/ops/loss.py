"""Chunked lm_head + cross entropy: the loss of a long sequence without materialising its fp32
logits [T, V] (at 64K tokens and V = 32768 those alone are 8 GiB, and autograd would keep them).

The forward pass walks the tokens in chunks; for each chunk it computes the logits, the loss and,
right away, the gradient of the loss with respect to the hidden states and the lm_head weight
(softmax minus one-hot), so nothing of size [T, V] outlives a chunk. Backward only scales the
stored gradients."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return hidden.dtype


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, need_grad):
        dt = _compute_dtype(hidden)
        h, w = hidden.to(dt), weight.to(dt)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        for start in range(0, h.shape[0], chunk_size):
            end = min(start + chunk_size, h.shape[0])
            logits = (h[start:end] @ w.t()).float()
            t = targets[start:end]
            valid = t != IGNORE_INDEX
            safe = t.clamp(min=0)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe[:, None])[:, 0]
            total += ((lse - picked) * valid).sum()
            if need_grad:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                probs[torch.arange(end - start, device=t.device), safe] -= 1.0
                probs *= valid[:, None]
                g = probs.to(dt)
                grad_h[start:end] = (g @ w).to(grad_h.dtype)
                grad_w += (g.t() @ h[start:end]).float()
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w)
            ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, (grad_w * grad_out).to(ctx.weight_dtype), None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over non-ignored targets of cross_entropy(hidden @ weight.T, target), and their count.

    hidden: [N, H]; weight: [V, H] (the lm_head); targets: [N] int64 with -100 for ignored rows.
    Under autocast the matmuls run in the autocast dtype and the softmax in fp32, like
    `lm_head(h).float()` followed by `F.cross_entropy`."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [N, H] and targets [N]; got {tuple(hidden.shape)}, "
                         f"{tuple(targets.shape)}")
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    total = _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size, need_grad)
    return total, (targets != IGNORE_INDEX).sum()


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """Per-token log p(target): the forward keeps only each token's log-sum-exp; the backward
    recomputes each chunk's logits (one more lm_head matmul) to form softmax minus one-hot
    scaled by that token's incoming gradient (which the forward cannot know)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        dt = _compute_dtype(hidden)
        h, w = hidden.to(dt), weight.to(dt)
        out = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lses = torch.zeros_like(out)
        for start in range(0, h.shape[0], chunk_size):
            end = min(start + chunk_size, h.shape[0])
            logits = (h[start:end] @ w.t()).float()
            t = targets[start:end]
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, t.clamp(min=0)[:, None])[:, 0]
            out[start:end] = (picked - lse) * (t != IGNORE_INDEX)
            lses[start:end] = lse
        ctx.save_for_backward(hidden, weight, targets, lses)
        ctx.chunk_size, ctx.dt = chunk_size, dt
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, lses = ctx.saved_tensors
        dt, chunk_size = ctx.dt, ctx.chunk_size
        h, w = hidden.to(dt), weight.to(dt)
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, h.shape[0], chunk_size):
            end = min(start + chunk_size, h.shape[0])
            t = targets[start:end]
            g = grad_out[start:end].float() * (t != IGNORE_INDEX)
            probs = ((h[start:end] @ w.t()).float() - lses[start:end, None]).exp_()
            grad = probs.mul_(-g[:, None])  # d log p_t / d logits = one-hot - softmax
            grad[torch.arange(end - start, device=t.device), t.clamp(min=0)] += g
            gl = grad.to(dt)
            grad_h[start:end] = (gl @ w).to(grad_h.dtype)
            grad_w += (gl.t() @ h[start:end]).float()
        return grad_h, grad_w.to(weight.dtype), None, None


def chunked_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           chunk_size: int = 4096) -> torch.Tensor:
    """[N] log-softmax(hidden @ weight.T)[target] (0 where target is -100), differentiable,
    never holding more than one chunk's logits: the per-token form DPO and GRPO need."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [N, H] and targets [N]; got {tuple(hidden.shape)}, "
                         f"{tuple(targets.shape)}")
    return _ChunkedTokenLogprobs.apply(hidden, weight, targets, chunk_size)
