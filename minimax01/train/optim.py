"""AdamW with the usual exemptions from weight decay, the learning-rate schedules and the paper's
batch-size warm-up. Schedules are pure functions of the step (and the warm-up of the token count),
so a resumed run needs no scheduler state to follow the uninterrupted one exactly."""

from __future__ import annotations

import math

import torch

from .config import OptimConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed matrices, and the exempt norms (every 1-D weight) and token
    embeddings. The lm_head is a projection and is decayed (unless tied to the embeddings)."""
    decay, no_decay = [], []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim < 2 or "embed_tokens" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW (fp32 master weights: the model's parameters stay fp32 under autocast). Fused on
    CUDA when every parameter is a plain CUDA tensor."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and all(p.is_cuda and type(p) is torch.nn.Parameter for p in params)
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`.

    Linear warm-up over `warmup_steps`, then: wsd - flat, and a linear decay to
    `lr * min_lr_ratio` over the last `decay_fraction` of the steps; cosine - half a cosine down
    to the minimum at the last step; linear - a straight line down; constant - flat."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    warm = cfg.warmup_steps
    if step < warm:
        return peak * (step + 1) / warm
    if cfg.schedule == "constant":
        return peak
    last = max(total_steps - 1, 1)
    if cfg.schedule == "wsd":
        decay_steps = int(round(cfg.decay_fraction * total_steps))
        start = max(total_steps - decay_steps, warm)
        if step < start or decay_steps == 0:
            return peak
        frac = min((step - start + 1) / max(last - start + 1, 1), 1.0)
        return peak + (floor - peak) * frac
    frac = min(max((step - warm) / max(last - warm, 1), 0.0), 1.0)
    if cfg.schedule == "cosine":
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))
    if cfg.schedule == "linear":
        return peak + (floor - peak) * frac
    raise ValueError(f"unknown optim.schedule {cfg.schedule!r}")


def micro_batches_at(tokens_seen: float, grad_accum: int, batch_warmup_tokens) -> int:
    """Micro-batches in the next optimizer step under the batch-size warm-up (MiniMax-01 §4:
    the batch doubles at given token counts). Before the first mark the batch is
    `grad_accum / 2^len(marks)` micro-batches; each mark passed doubles it, up to `grad_accum`."""
    remaining = sum(1 for mark in batch_warmup_tokens if tokens_seen < mark)
    return max(grad_accum >> remaining, 1)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
