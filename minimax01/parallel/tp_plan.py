"""The tensor-parallel slicing plan: which part of every model tensor rank r of N holds (Megatron
style, one all-reduce after each attention and each MoE block). A pure function of the config;
`checkpoint.sliced.SlicedReader.load(plan)` reads exactly these parts from the checkpoint.

    embed_tokens, lm_head           vocab-parallel: rows [r*ceil(V/N), ...) (the last rank may hold
                                    fewer; the engine pads)
    lightning qkv_proj [3Hd, h]     heads [r*H/N, (r+1)*H/N): rows are per-head interleaved q|k|v
                                    (SPEC §3), so a head block is ONE contiguous block of 3d rows
    lightning output_gate, norm     the same heads' d rows each; the norm then needs the
                                    cross-rank sum of squares (parallel/tp_norm.py)
    lightning out_proj [h, Hd]      the same heads' columns (row-parallel)
    softmax q_proj / o_proj         heads (rows / columns)
    softmax k_proj, v_proj          KV heads split when N divides Hkv, else each rank holds the one
                                    KV head its query heads use (replicated N/Hkv times)
    experts gate_up_proj [E, 2I, h] intermediate [r*I/N, (r+1)*I/N) of w1 AND the same of w3
                                    (two row ranges); down_proj [E, h, I] the same columns
    expert_parallel=True            experts [r*E/N, (r+1)*E/N) whole instead
    router, layer norms, final norm replicated
8-bit scales follow their weight's rows (a column split leaves them whole)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..checkpoint.sliced import ParamSlices, Slice, sliced_shape
from ..config import ModelConfig

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


@dataclass(frozen=True)
class TPShape:
    """Per-rank sizes of a plan (for engines and the memory planner)."""

    tp: int
    heads: int           # query heads per rank (lightning and softmax)
    kv_heads: int        # KV heads per rank (after replication)
    kv_replicas: int     # ranks holding each KV head (1: split)
    intermediate: int    # expert intermediate per rank (full with expert parallel)
    experts: int         # experts per rank
    vocab: int           # vocab rows per rank (the largest shard)


def tp_shape(config: ModelConfig, tp: int, expert_parallel: bool = False) -> TPShape:
    """Check that `config` splits over `tp` ranks and return the per-rank sizes; ValueError
    naming the field that does not divide."""
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tensor parallel size must be a positive integer, got {tp!r}")
    h, hkv = config.num_attention_heads, config.num_key_value_heads
    if h % tp:
        raise ValueError(f"tensor parallel size {tp} does not divide num_attention_heads={h}")
    if hkv % tp == 0:
        kv, replicas = hkv // tp, 1
    elif tp % hkv == 0:
        kv, replicas = 1, tp // hkv
    else:
        raise ValueError(f"tensor parallel size {tp} neither divides nor is a multiple of "
                         f"num_key_value_heads={hkv}")
    e, i = config.num_local_experts, config.intermediate_size
    if expert_parallel:
        if e % tp:
            raise ValueError(f"expert parallel size {tp} does not divide num_local_experts={e}")
        experts, inter = e // tp, i
    else:
        if i % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide intermediate_size={i}")
        experts, inter = e, i // tp
    return TPShape(tp, h // tp, kv, replicas, inter, experts, math.ceil(config.vocab_size / tp))


def _rows(start, stop, dim=0) -> ParamSlices:
    return (Slice.range(dim, start, stop),)


def param_slices(param: str, config: ModelConfig, tp: int, rank: int,
                 expert_parallel: bool = False) -> ParamSlices:
    """The part of model tensor `param` that rank `rank` of `tp` holds."""
    if not 0 <= rank < tp:
        raise ValueError(f"rank {rank} is outside [0, {tp})")
    s = tp_shape(config, tp, expert_parallel)
    d = config.head_dim
    h0, h1 = rank * s.heads, (rank + 1) * s.heads
    if param in ("model.embed_tokens.weight", "lm_head.weight"):
        v0 = min(rank * s.vocab, config.vocab_size)
        return _rows(v0, min(v0 + s.vocab, config.vocab_size))
    if param == "model.norm.weight":
        return ()
    m = _LAYER.fullmatch(param)
    if m is None:
        raise ValueError(f"no tensor-parallel rule for {param!r}")
    rest = m.group(2)
    scale = rest.endswith("_scale")
    base = rest[:-len("_scale")] if scale else rest
    if rest in ("input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate.weight"):
        return ()
    if base == "self_attn.qkv_proj.weight":
        return _rows(3 * d * h0, 3 * d * h1)
    if base in ("self_attn.output_gate.weight", "self_attn.q_proj.weight") \
            or rest == "self_attn.norm.weight":
        return _rows(d * h0, d * h1)
    if base in ("self_attn.out_proj.weight", "self_attn.o_proj.weight"):
        return () if scale else _rows(d * h0, d * h1, dim=1)
    if base in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
        kv0 = rank // s.kv_replicas * s.kv_heads
        return _rows(d * kv0, d * (kv0 + s.kv_heads))
    if base in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
        if expert_parallel:
            return _rows(rank * s.experts, (rank + 1) * s.experts)
        i, n = config.intermediate_size, s.intermediate
        i0, i1 = rank * n, (rank + 1) * n
        if base == "mlp.experts.gate_up_proj":  # w1 rows then w3 rows, each split the same way
            return (Slice(1, ((i0, i1), (i + i0, i + i1))),)
        return () if scale else (Slice.range(2, i0, i1),)
    raise ValueError(f"no tensor-parallel rule for {param!r}")


def tp_plan(param_shapes: dict[str, tuple[int, ...]], config: ModelConfig, tp: int, rank: int,
            expert_parallel: bool = False) -> dict[str, ParamSlices]:
    """param -> slices for every tensor in `param_shapes` (e.g. SlicedReader.param_shapes, which
    includes the 8-bit scales of a pre-quantised checkpoint)."""
    return {p: param_slices(p, config, tp, rank, expert_parallel) for p in param_shapes}


def rank_shapes(param_shapes: dict[str, tuple[int, ...]], plan: dict[str, ParamSlices]):
    """param -> the shape rank's part has."""
    return {p: sliced_shape(param_shapes[p], plan[p]) for p in plan}
