"""Preparing a model for the serving engine: what changes, explicitly, and how to undo it.

`prepare_for_serving(model)` changes the model in place and returns a function that restores it:

  * eval mode: dropless MoE (no capacity), no dropout;
  * on CUDA (or with `sync_free=True`), every MoE block on the serving configuration of the MoE
    pipeline (ops/moe.py `SERVING`): the same function as eval mode, computed without a single
    host synchronisation (grouped matmul offsets stay on the device, no routing statistics), so a
    decode step can be captured in a CUDA graph. On the CPU there is nothing to capture and the
    default pipeline is faster (one matmul per expert instead of every expert over every row).

Weights, dtype and device are not touched (`cast_model` does that). `Engine(model)` calls this
and keeps the restore function: `engine.close()` gives the model back as it was."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from ..ops.moe import SERVING


def cast_model(model, device=None, dtype: torch.dtype | None = None):
    """Move `model` to `device` and cast its parameters to `dtype`, leaving buffers (the fp32
    lightning decay slopes) in their own dtype, unlike `model.to(dtype)`."""
    if device is not None:
        model.to(device)
    if dtype is not None:
        for p in model.parameters():
            p.data = p.data.to(dtype)
    return model


def prepare_for_serving(model, sync_free: bool | None = None) -> Callable[[], None]:
    """Put `model` in serving form (see the module docstring); returns `restore()`, which puts
    back its training mode and MoE pipelines. `sync_free` None: on when the model is on CUDA."""
    if sync_free is None:
        sync_free = next(model.parameters()).is_cuda
    was_training = model.training
    moes = [layer.mlp for layer in model.model.layers]
    before = [m.pipeline for m in moes]
    model.eval()
    if sync_free:
        for m in moes:  # a pipeline with a reduce (tensor parallel) keeps it and its exchange
            m.pipeline = SERVING if m.pipeline.reduce is None else \
                replace(m.pipeline, sync_free=True, aux_loss=False)

    def restore() -> None:
        for m, p in zip(moes, before):
            m.pipeline = p
        model.train(was_training)

    return restore
