"""Selective activation checkpointing (`train.recompute`): which part of every decoder layer
keeps no activations in the forward and recomputes them in the backward.

    none       keep everything (fastest, most memory)
    full       the whole decoder layer (least memory: one [T, H] input per layer is kept)
    attention  the attention block (projections, lightning / softmax attention, output gate)
    moe        the MoE block (router, experts' [rows, 2I] intermediate, combine): the largest
               activations of a wide MoE; under EP its all-to-alls run again in the backward

Applied to a built model from outside, like parallelism: the block's `forward` is wrapped in a
non-reentrant `torch.utils.checkpoint` (an instance attribute, so parameter names and the
state dict are unchanged), and the recomputation in the backward runs inside a profiler range
named "recompute" (benchmarks/mfu.py reads its share). Gradients are those of no recompute
(tests/test_train_precision.py)."""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

RECOMPUTE = ("none", "full", "attention", "moe")


def _checkpointed(forward):
    def body(*args, **kwargs):
        if torch._C._current_graph_task_id() != -1:  # inside the backward: the recomputation
            with torch.profiler.record_function("recompute"):
                return forward(*args, **kwargs)
        return forward(*args, **kwargs)

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if torch.is_grad_enabled():
            return checkpoint(body, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)
    return run


def apply_recompute(model: torch.nn.Module, policy: str) -> None:
    """Set `policy` (one of RECOMPUTE) on every decoder layer of `model`."""
    if policy not in RECOMPUTE:
        raise ValueError(f"train.recompute must be one of {', '.join(RECOMPUTE)}, got {policy!r}")
    model.set_gradient_checkpointing(False)  # "full" is this module's too (labelled)
    blocks = {"full": lambda layer: layer, "attention": lambda layer: layer.self_attn,
              "moe": lambda layer: layer.mlp}
    for layer in model.model.layers:
        for block in (layer, layer.self_attn, layer.mlp):
            block.__dict__.pop("forward", None)  # undo an earlier policy
        if policy in blocks:
            block = blocks[policy](layer)
            block.forward = _checkpointed(type(block).forward.__get__(block))
