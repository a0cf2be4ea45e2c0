"""Rollouts for online RL with minimax01's own serving engine (infer/engine.py), in the
trainer's process and on its device.

The engine runs its own copy of the weights in the serving dtype (bf16 on GPU), with its slot
pool (lightning states and KV cache) allocated once, and CUDA graphs for decode on GPU. After
each optimizer step `sync_weights` copies the trainer's fp32 master weights into that copy in
place (a device-to-device cast, no disk, and the captured graphs stay valid because no tensor is
reallocated); under FSDP every rank gathers the full tensors (DTensor.full_tensor) first."""

from __future__ import annotations

import torch

from ...infer.engine import Engine
from ...infer.prepare import cast_model
from ...infer.request import SamplingParams
from ...model import MiniMaxForCausalLM


@torch.no_grad()
def sync_weights(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """dst's parameters <- src's (any dtype; src may be FSDP-sharded: all ranks call it)."""
    from torch.distributed.tensor import DTensor

    target = dict(dst.named_parameters())
    for name, p in src.named_parameters():
        t = p.full_tensor() if isinstance(p, DTensor) else p
        q = target.get(name)
        if q is None or q.shape != t.shape:
            raise ValueError(f"cannot hand {name} {tuple(t.shape)} to the rollout engine "
                             f"(it holds {None if q is None else tuple(q.shape)})")
        q.copy_(t)


def rollout_engine(model: torch.nn.Module, config, device: torch.device, tokenizer,
                   max_context: int, num_slots: int) -> Engine:
    """An engine over a serving copy of `model`'s weights (bf16 on CUDA, fp32 on CPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        copy = MiniMaxForCausalLM(config)
    cast_model(copy, dtype=dtype)
    sync_weights(model, copy)
    return Engine(copy, tokenizer, max_context=max_context, num_slots=num_slots,
                  prefill_chunk=max(max_context, 1024))


def sample_groups(engine: Engine, prompts: list[list[int]], group_size: int, *, max_tokens: int,
                  temperature: float, top_p: float, seed: int) -> list[list]:
    """`group_size` sampled completions (infer.request.Completion) per prompt."""
    ids, params = [], []
    for i, p in enumerate(prompts):
        for g in range(group_size):
            ids.append(p)
            params.append(SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                         top_p=top_p, seed=seed + i * group_size + g))
    out = engine.generate(ids, params)
    for c in out:
        if c.error is not None:
            raise RuntimeError(f"rollout generation failed: {c.error}")
    return [out[i * group_size:(i + 1) * group_size] for i in range(len(prompts))]


def greedy(engine: Engine, prompts: list[list[int]], max_tokens: int) -> list:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return engine.generate(prompts, params)
