"""Low-precision compute weights cast once per optimizer step (`train.cast_weights = "per_step"`).

Under bf16 autocast over fp32 weights every use of a weight casts it (and its gradient back),
and the experts' grouped matmul casts its stacked weights per token group: at Text-01's widths
these casts cost about a quarter of a forward+backward. Here the matrices (every >= 2-D weight
but the token embeddings, i.e. what autocast would cast for a matmul) are cast to the compute
dtype once at the start of an optimizer step and the model computes with them (autocast's
casts of an already-bf16 weight are no-ops); each micro-batch's low-precision gradient is added
into an fp32 gradient as soon as it is accumulated, and at the end of the step the parameters
are the fp32 masters again, with fp32 gradients. So clipping, the optimizer, checkpoints,
evaluation and export see exactly the fp32 model they see under "per_use"; only the forward and
backward of the step's micro-batches differ (by bf16 rounding of the weights, which autocast
does too).

Swapping `param.data` (the trick FSDP1's mixed precision used) keeps the parameters' identity,
so the optimizer's state and the state-dict keys are untouched. One process only: under FSDP2
the all-gather casts the shards (`parallel.param_dtype`)."""

from __future__ import annotations

import torch

CAST_WEIGHTS = ("per_use", "per_step")


def compute_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters held in the compute dtype during a step: matrices, not the embeddings."""
    out, seen = [], set()
    for name, p in model.named_parameters():
        if p.requires_grad and p.ndim >= 2 and "embed_tokens" not in name and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


class StepCastWeights:
    """`begin()` before a step's first micro-batch, `end()` after its last backward (before
    clipping and the optimizer step)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        self.params = compute_weights(model)
        self.dtype = dtype
        self.masters: list[torch.Tensor] | None = None
        self.grads: list[torch.Tensor | None] = [None] * len(self.params)
        self.hooks = [p.register_post_accumulate_grad_hook(self._hook(i))
                      for i, p in enumerate(self.params)]

    def _hook(self, i: int):
        def fold(p: torch.nn.Parameter) -> None:  # the low-precision grad into the fp32 one
            if self.masters is None:
                return
            if self.grads[i] is None:
                self.grads[i] = p.grad.float()
            else:
                self.grads[i].add_(p.grad)
            p.grad = None
        return fold

    def begin(self) -> None:
        if self.masters is not None:
            raise RuntimeError("StepCastWeights.begin() twice without end()")
        self.masters = [p.data for p in self.params]
        with torch.no_grad():
            for p, master in zip(self.params, self.masters):
                p.data = master.to(self.dtype)

    def end(self) -> None:
        """Masters back in place, with the step's fp32 gradients (None where none came)."""
        if self.masters is None:
            return
        for i, (p, master) in enumerate(zip(self.params, self.masters)):
            p.data = master
            p.grad = self.grads[i]
            self.grads[i] = None
        self.masters = None

    def remove(self) -> None:
        self.end()
        for h in self.hooks:
            h.remove()
