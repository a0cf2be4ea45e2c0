"""LoRA (arXiv 2106.09685) on the attention projections, with merge-and-export.

Why not peft: its LoRA layers wrap `nn.Linear`, which ours are, but it brings transformers and
accelerate (not dependencies of this project, and absent on offline GPU hosts), it does not know
FSDP2 DTensor shards or our stacked experts, and a merge must produce our released layout anyway.
The adapter is a few lines:

    y = x W^T + (alpha / r) * (x A^T) B^T,   A [r, in] (Kaiming-uniform), B [out, r] (zeros)

so an adapted model starts exactly at the base model. `LoRALinear` is an `nn.Linear` that keeps
the base `weight` under its own name (checkpoints load unchanged) and adds `lora_A` / `lora_B`.
Only the adapters train. `merge_state_dict` folds them into the weights (W + scale * B @ A) for an
export in the released format; `merge_lora` does the same in place on a model in one process."""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LORA_KEYS = ("lora_A", "lora_B")


class LoRALinear(nn.Linear):
    """An nn.Linear (no bias) plus a rank-r update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        if base.bias is not None:
            raise ValueError("LoRA targets here have no bias")
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", None)
        self.rank, self.scaling = rank, alpha / rank
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) + self.scaling * F.linear(F.linear(x, self.lora_A),
                                                                   self.lora_B)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, scaling={self.scaling}"


def apply_lora(model: nn.Module, rank: int, alpha: float, targets, seed: int = 0) -> list[str]:
    """Replace every target projection (by attribute name: q_proj, qkv_proj, ...) with a
    LoRALinear and freeze everything else. Returns the adapted modules' names. On the meta
    device the adapters are initialised later, by reset_lora (after the weights are loaded)."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    targets = set(targets)
    model.requires_grad_(False)
    done = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                full = f"{name}.{child_name}" if name else child_name
                adapter = LoRALinear(child, rank, alpha)
                if child.weight.device.type != "meta":
                    reset_adapter(adapter, full, seed)
                setattr(module, child_name, adapter)
                done.append(full)
    if not done:
        raise ValueError(f"train.lora.targets {sorted(targets)}: no such projection in the model")
    for p in lora_parameters(model):
        p.requires_grad_(True)
    return done


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """Hold the frozen matrices of the decoder layers in `dtype` (the autocast dtype: they have
    no optimizer state, so no fp32 master is needed); norms, embeddings, lm_head and the adapters
    stay fp32 (the residual stream stays fp32, as in full training)."""
    for layer in model.model.layers:
        for module in layer.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if not p.requires_grad and p.ndim >= 2 and p.dtype != dtype:
                    setattr(module, name, nn.Parameter(p.detach().to(dtype), requires_grad=False))


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in LORA_KEYS]


def _full_init(name: str, shape, seed: int) -> torch.Tensor:
    """A's initial value (the same in every layout: drawn whole, from the name and seed)."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2 ** 63 - 1))
    bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and peft
    return (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1).mul_(bound)


@torch.no_grad()
def reset_adapter(module: LoRALinear, name: str, seed: int = 0) -> None:
    from .init_from import local_slices

    for key, p in (("lora_A", module.lora_A), ("lora_B", module.lora_B)):
        got = local_slices(p)
        if got is None:
            continue
        slices, local = got
        if key == "lora_B":
            local.zero_()
            continue
        full = _full_init(f"{name}.lora_A", tuple(p.shape), seed)
        for s in slices:
            (a, b), = s.ranges
            full = full.narrow(s.dim, a, b - a)
        local.copy_(full)


def reset_lora(model: nn.Module, seed: int = 0) -> None:
    """(Re)initialise every adapter of a model in any layout: A as drawn from (seed, name), B = 0."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            reset_adapter(module, name, seed)


def merge_state_dict(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A full state dict with adapters -> the base model's state dict, each adapted weight
    W + scaling * B @ A (computed in fp32, returned in W's dtype)."""
    out = {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in LORA_KEYS}
    for key, a in state.items():
        if not key.endswith(".lora_A"):
            continue
        prefix = key[:-len("lora_A")]
        w, b = state[prefix + "weight"], state[prefix + "lora_B"]
        out[prefix + "weight"] = (w.float() + scaling * (b.float() @ a.float())).to(w.dtype)
    return out


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight in place and put plain nn.Linear modules back (one
    process; a sharded model goes through merge_state_dict on its full state dict)."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                w = child.weight
                w.copy_((w.float() + child.scaling * (child.lora_B.float() @ child.lora_A.float()))
                        .to(w.dtype))
                plain = nn.Linear(child.in_features, child.out_features, bias=False,
                                  device="meta")
                plain.weight = w
                setattr(module, child_name, plain)
    return model
