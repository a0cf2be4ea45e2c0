"""Tensor names of the two checkpoint dialects (SPEC §6) and how they map onto the model's own
parameters, which carry the "hf" names.

legacy (official MiniMax-Text-01, and what transformers 5 itself writes to disk):
    model.layers.{i}.block_sparse_moe.gate.weight               [E, H]
    model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight     [I, H]  = gate_up_proj[e, :I]
    model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight     [I, H]  = gate_up_proj[e, I:]
    model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight     [H, I]  = down_proj[e]
hf (transformers >= 5 in memory, and our parameters):
    model.layers.{i}.mlp.gate.weight, .mlp.experts.gate_up_proj [E, 2I, H], .mlp.experts.down_proj [E, H, I]
Every other tensor has the same name in both."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from .errors import CheckpointError

LEGACY, HF = "legacy", "hf"
DIALECTS = (LEGACY, HF)

# transformers' lightning layers persist their decay tables; they are derived from the config
# (MiniMax-VL-01 nests the language model under `language_model.`: the same names, prefixed)
DERIVED = re.compile(r"(?:language_model\.)?model\.layers\.\d+\.self_attn\."
                     r"(slope_rate|query_decay|key_decay|diagonal_decay)")
_MLP = re.compile(r"((?:language_model\.)?model\.layers\.\d+)\.mlp\.(.+)")

Index = tuple  # of ints and slices, selecting the part of a model tensor a checkpoint tensor holds


@dataclass(frozen=True)
class Piece:
    """One checkpoint tensor: `name` holds `param[index]` of the model parameter `param`."""

    name: str
    param: str
    index: Index
    shape: tuple[int, ...]


def pieces(param: str, shape: tuple[int, ...], dialect: str) -> list[Piece]:
    """The checkpoint tensors that store model parameter `param` (of `shape`) in `dialect`."""
    if dialect not in DIALECTS:
        raise ValueError(f"dialect must be 'legacy' or 'hf', got {dialect!r}")
    shape = tuple(shape)
    m = _MLP.fullmatch(param)
    if dialect == HF or m is None:
        return [Piece(param, param, (), shape)]
    moe = m.group(1) + ".block_sparse_moe"
    rest = m.group(2)
    if rest == "gate.weight":
        return [Piece(f"{moe}.gate.weight", param, (), shape)]
    if rest == "experts.gate_up_proj":
        e, two_i, h = shape
        i = two_i // 2
        out = []
        for x in range(e):
            out.append(Piece(f"{moe}.experts.{x}.w1.weight", param, (x, slice(0, i)), (i, h)))
            out.append(Piece(f"{moe}.experts.{x}.w3.weight", param, (x, slice(i, 2 * i)), (i, h)))
        return out
    if rest == "experts.down_proj":
        e, h, i = shape
        return [Piece(f"{moe}.experts.{x}.w2.weight", param, (x,), (h, i)) for x in range(e)]
    raise ValueError(f"no legacy name for model parameter {param!r}")


def layout(param_shapes: dict[str, tuple[int, ...]], dialect: str) -> dict[str, Piece]:
    """Checkpoint name -> Piece for every model parameter, in parameter order."""
    out: dict[str, Piece] = {}
    for param, shape in param_shapes.items():
        for p in pieces(param, shape, dialect):
            out[p.name] = p
    return out


def detect_dialect(names: Iterable[str], fallback: str = HF) -> str:
    """The dialect of a set of tensor names: per-expert `block_sparse_moe` names are legacy, stacked
    `mlp.experts` are hf; names that say neither (no layers) take `fallback`. (Only the MoE's
    names count: a vision tower's `mlp.fc1` says nothing.)"""
    legacy = hf = False
    for n in names:
        legacy = legacy or ".block_sparse_moe." in n
        hf = hf or ".mlp.experts." in n or ".mlp.gate." in n
    if legacy and hf:
        raise CheckpointError("checkpoint mixes the legacy (block_sparse_moe.*) and hf (mlp.*) "
                              "MoE tensor names")
    return LEGACY if legacy else HF if hf else fallback


def config_dialect(config: dict) -> str:
    """The dialect a config.json is written in (legacy: MiniMaxText01, hf: minimax)."""
    return LEGACY if config.get("model_type") == "MiniMaxText01" or "attn_type_list" in config else HF
