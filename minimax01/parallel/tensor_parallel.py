"""Tensor-parallel inference models: `parallelize_for_inference(model, tp)` turns the single-device
model into this rank's part, from outside; `load_tp_model(path, tp)` builds that part on the meta
device and fills it with exactly its slices of a checkpoint (checkpoint/sliced.py), so no rank
ever holds the whole model, on the host or the device.

This rank's model is the ordinary `MiniMaxForCausalLM`, built from a *rank config* (the full
config with this rank's query heads, KV heads and expert intermediate size, parallel/tp_plan.py
`tp_shape`), so every shape-reading consumer (the engine's slot pool, HybridCache, the memory
planner) sizes itself per rank without knowing about TP. On top, from parallel/tp_modules.py:
vocab-parallel embedding and lm_head, the lightning norm over the full width, a reduce hook on
every out_proj / o_proj, each MoE block's pipeline with `reduce` = the all-reduce (and, with
expert parallel, the `LocalExperts` exchange), and each lightning layer's decay slopes of ITS
heads. Per forward: one all-reduce per sub-layer (attention, MoE) plus one for the embedding,
and one all-gather of the logits. `model.tensor_parallel` (TPInfo) holds the full config."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import LINEAR, ModelConfig
from ..model import MiniMaxForCausalLM
from ..model.layers import Experts, LightningAttention
from ..ops.lightning import lightning_slopes
from ..ops.moe import LOCAL, MoEPipeline
from ..ops.quant import quantize, storage_dtype
from ..quant import QuantizedExperts, quantization_of, quantize_on_meta, quantized_tensors
from .tp_modules import (FusedNormReduce, LocalExperts, ReduceOutput, TPGroup, TPLightningNorm,
                         VocabParallelEmbedding, VocabParallelHead)
from .tp_plan import TPShape, tp_plan, tp_shape

log = logging.getLogger(__name__)

TIED_HEAD = "lm_head.weight"


@dataclass
class TPInfo:
    """What a rank's model knows about its place in the group."""

    config: ModelConfig        # the full model's config (model.config is the rank config)
    shape: TPShape
    tp: TPGroup
    expert_parallel: bool
    fused_norm: bool


def rank_config(config: ModelConfig, shape: TPShape) -> ModelConfig:
    """The config whose shapes are this rank's: its query heads, KV heads, expert intermediate
    size. The vocabulary, the router's experts and the hidden size stay whole."""
    return config.replace(num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                          intermediate_size=shape.intermediate)


def _take(t: torch.Tensor, slices) -> torch.Tensor:
    """The part `slices` (tp_plan's) of an in-memory tensor, as a new tensor."""
    for s in slices:
        t = torch.cat([t.narrow(s.dim, a, b - a) for a, b in s.ranges], s.dim)
    return t.contiguous().clone()


def parallelize_for_inference(model: MiniMaxForCausalLM, tp: TPGroup, *,
                              expert_parallel: bool = False,
                              fused_norm: bool = True) -> MiniMaxForCausalLM:
    """This rank's part of `model` (a new module; `model` is left as it is). A model on the meta
    device gives a meta model (fill it with `load_rank_state`); a materialised one (small
    models, tests) has its tensors sliced on its device. Quantised modules stay quantised. Raises
    ValueError when the config does not split over tp.size ranks (tp_plan.tp_shape)."""
    full = model.config
    shape = tp_shape(full, tp.size, expert_parallel)
    qc = quantization_of(model)
    rcfg = rank_config(full, shape)
    with torch.device("meta"):
        rank = MiniMaxForCausalLM(rcfg)
        if qc is not None:
            quantize_on_meta(rank, qc)
        h, v = full.hidden_size, full.vocab_size
        rank.model.embed_tokens = VocabParallelEmbedding(v, h, tp)
        rank.lm_head = VocabParallelHead(v, h, tp)
        if full.tie_word_embeddings:
            rank.lm_head.weight = rank.model.embed_tokens.weight
    h0 = tp.rank * shape.heads
    for i, layer in enumerate(rank.model.layers):
        attn = layer.self_attn
        if layer.layer_type == LINEAR:
            attn.norm = TPLightningNorm(shape.heads * full.head_dim, full.attn_width,
                                        full.lightning_norm_eps, tp, fused_norm, device="meta")
            hook = FusedNormReduce(tp, attn.norm) if fused_norm else ReduceOutput(tp)
            attn.out_proj.register_forward_hook(hook)
            attn.slope = lightning_slopes(full.num_attention_heads, i,
                                          full.num_hidden_layers)[h0:h0 + shape.heads].clone()
        else:
            attn.o_proj.register_forward_hook(ReduceOutput(tp))
        exchange = LOCAL
        if expert_parallel:
            exchange = LocalExperts(tp.rank * shape.experts, shape.experts)
            if qc is not None and "experts" in qc.modules:
                layer.mlp.experts = QuantizedExperts(shape.experts, h, shape.intermediate,
                                                     qc.format, device="meta")
            else:
                with torch.device("meta"):  # (top-k only has to be valid for the constructor)
                    layer.mlp.experts = Experts(rcfg.replace(num_local_experts=shape.experts,
                                                             num_experts_per_tok=1))
        layer.mlp.pipeline = MoEPipeline(exchange=exchange, aux_loss=False, reduce=tp.all_reduce)
    rank.tensor_parallel = TPInfo(full, shape, tp, expert_parallel, fused_norm)
    if not next(model.parameters()).is_meta:
        device = next(model.parameters()).device
        state = model.state_dict()
        plan = tp_plan({n: tuple(t.shape) for n, t in state.items()}, full, tp.size, tp.rank,
                       expert_parallel)
        load_rank_state(rank, {n: _take(state[n].detach(), plan[n]) for n in plan}, device)
    return rank.eval()


def load_rank_state(rank: MiniMaxForCausalLM, state: dict[str, torch.Tensor],
                    device: torch.device | str) -> MiniMaxForCausalLM:
    """Assign this rank's tensors (names as in the single-device model) into its meta model and
    move the decay slopes to `device`; every tensor must be given (strict)."""
    device = torch.device(device)
    tied = rank.tensor_parallel.config.tie_word_embeddings
    if tied:
        state = {**state, TIED_HEAD: state["model.embed_tokens.weight"]}
    rank.load_state_dict(state, strict=True, assign=True)
    if tied:
        rank.lm_head.weight = rank.model.embed_tokens.weight
    for module in rank.modules():
        if isinstance(module, LightningAttention):
            module.slope = module.slope.to(device)
    for p in rank.parameters():
        p.requires_grad_(False)
    left = [n for n, t in [*rank.named_parameters(), *rank.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"tensor-parallel model: tensors still unset: {', '.join(left[:5])}")
    return rank


def _quantize_rows(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row 8-bit quantisation of a rank's slice, one expert at a time (bounded temporaries)."""
    if w.dim() == 2:
        return quantize(w, fmt)
    q = torch.empty(w.shape, dtype=storage_dtype(fmt), device=w.device)
    s = torch.empty(w.shape[:-1], dtype=torch.float32, device=w.device)
    for e in range(w.shape[0]):
        q[e], s[e] = quantize(w[e], fmt)
    return q, s


def load_tp_model(path: str | Path, tp: TPGroup, *, dtype=None, device=None, quantization=None,
                  expert_parallel: bool = False, fused_norm: bool = True) -> MiniMaxForCausalLM:
    """This rank's part of the checkpoint at `path`, read slice by slice (`SlicedReader`, both
    dialects, pre-quantised checkpoints as stored). quantization: as `from_pretrained` ("int8" |
    "fp8" quantise a 16-bit checkpoint while loading: each rank quantises its own slices, so
    weights split along their input dim -- out_proj, o_proj, down_proj -- get per-rank row scales,
    a valid quantisation but not the bytes of a pre-quantised checkpoint; "none"; None: as
    stored)."""
    from ..dtypes import dtype_name, resolve_dtype, torch_dtype
    from ..checkpoint.quantized import choose
    from ..checkpoint.sliced import SlicedReader
    from ..quant import check_supported

    device = torch.device(device if device is not None else "cpu")
    start = time.perf_counter()
    with SlicedReader(path) as sr:
        qc = choose(sr.quantization, quantization)
        dtype = resolve_dtype(dtype) or torch_dtype(sr.config.dtype)
        full = sr.config.replace(dtype=dtype_name(dtype))
        meta = MiniMaxForCausalLM.from_config_on_meta(full)
        if qc is not None:
            check_supported(qc.format, device)
            quantize_on_meta(meta, qc)
        rank = parallelize_for_inference(meta, tp, expert_parallel=expert_parallel,
                                         fused_norm=fused_norm)
        plan = tp_plan(sr.param_shapes, full, tp.size, tp.rank, expert_parallel)
        if full.tie_word_embeddings:
            plan.pop(TIED_HEAD, None)
        late = set(quantized_tensors(full, qc)) if qc is not None and sr.quantization is None \
            else set()
        state = sr.load({p: s for p, s in plan.items() if p not in late}, dtype=dtype,
                        device=device)
        for p in sorted(late):
            state[p], state[p + "_scale"] = _quantize_rows(
                sr.read(p, plan[p], dtype=dtype, device=device), qc.format)
        log.info("rank %d/%d: read %.3f GiB of %s in %.1fs (%s%s)", tp.rank, tp.size,
                 sr.bytes_read / 2 ** 30, path, time.perf_counter() - start,
                 qc.format if qc else dtype_name(dtype),
                 ", expert parallel" if expert_parallel else "")
    return load_rank_state(rank, state, device)


@torch.no_grad()
def materialize_random(rank: MiniMaxForCausalLM, device, seed: int = 0) -> MiniMaxForCausalLM:
    """Random weights for a meta rank model, built on `device` (benchmarks at Text-01's shapes,
    `serve --preset` of models too big to build whole): N(0, 1/fan_in) matrices, unit norms, 8-bit
    tensors uniform over their range with matching scales. Each rank draws its own (seed, rank)
    stream, so the group is one random model but not the one a single process would draw."""
    device = torch.device(device)
    tp = rank.tensor_parallel.tp
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + tp.rank)
    rank.to_empty(device=device)
    buffers = dict(rank.named_buffers())
    for name, t in [*rank.named_parameters(), *buffers.items()]:
        if name.endswith("slope"):
            continue
        fan_in = t.shape[-1] if t.dim() > 1 else 1
        if name.endswith("_scale"):  # int8 uniform over [-127, 127] has std ~73; e4m3 here ~1
            w = buffers[name[:-len("_scale")]]
            t.fill_(w.shape[-1] ** -0.5 / (73.0 if w.dtype == torch.int8 else 1.0))
        elif t.dtype == torch.int8:
            t.copy_(torch.randint(-127, 128, t.shape, generator=gen, device=device,
                                  dtype=torch.int8))
        elif t.dtype.is_floating_point and t.element_size() == 1:  # fp8: ~N(0, 1) values
            t.copy_(torch.randn(t.shape, generator=gen, device=device).clamp(-448, 448).to(t.dtype))
        elif t.dim() == 1:
            t.fill_(1.0)
        else:
            t.normal_(0.0, fan_in ** -0.5, generator=gen)
    for module in rank.modules():
        if isinstance(module, LightningAttention):
            full = rank.tensor_parallel.config
            h0 = tp.rank * module.num_heads
            module.slope = lightning_slopes(full.num_attention_heads, module.layer_idx,
                                            full.num_hidden_layers)[h0:h0 + module.num_heads] \
                .to(device)
    if rank.tensor_parallel.config.tie_word_embeddings:
        rank.lm_head.weight = rank.model.embed_tokens.weight
    return rank
