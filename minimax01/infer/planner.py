"""Memory planner: how many cache slots of a given context length fit beside the weights.

Per slot the engine reserves a constant-size fp32 lightning state for every lightning layer plus
K/V for `max_context` tokens in every softmax layer (SPEC §7); the weights, the temporaries of
one prefill chunk and a safety margin come off the top. For MiniMax-Text-01 the lightning state
is ~294 MB per sequence at any length while KV grows by 40 KiB per token, so long contexts are
bounded by the 10 softmax layers alone."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig

GiB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class MemoryPlan:
    max_context: int
    num_slots: int
    prefill_chunk: int
    budget_bytes: int            # memory the engine may use (free memory x utilisation)
    weights_bytes: int           # counted when the weights are not loaded yet
    activation_bytes: int        # one prefill chunk's temporaries + decode logits + margin
    state_bytes_per_slot: int    # lightning states
    kv_bytes_per_slot: int       # softmax-layer K/V at max_context
    prefix_cache_bytes: int = 0  # the prefix cache's budget (infer/prefix_cache.py)

    @property
    def slot_bytes(self) -> int:
        return self.state_bytes_per_slot + self.kv_bytes_per_slot

    @property
    def pool_bytes(self) -> int:
        return (self.num_slots + 1) * self.slot_bytes  # + the scratch slot

    def table(self) -> str:
        rows = [
            ("memory budget", self.budget_bytes),
            ("weights", self.weights_bytes),
            ("activations (one prefill chunk) + margin", self.activation_bytes),
            ("prefix cache budget", self.prefix_cache_bytes),
            ("lightning state per sequence (any length)", self.state_bytes_per_slot),
            (f"softmax K/V per sequence at {self.max_context:,} tokens", self.kv_bytes_per_slot),
            (f"cache pool: {self.num_slots} slots + 1 scratch", self.pool_bytes),
        ]
        width = max(len(r[0]) for r in rows)
        lines = [f"{name:<{width}}  {size / GiB:10.3f} GiB" for name, size in rows]
        lines.append(f"{'concurrent sequences at max context':<{width}}  {self.num_slots:10d}")
        lines.append(f"{'max_num_batched_tokens':<{width}}  {self.prefill_chunk:10d}")
        return "\n".join(lines)


def activation_bytes(cfg: ModelConfig, prefill_chunk: int, max_batch: int,
                     dtype_bytes: int) -> int:
    """Upper estimate of the temporaries of one packed prefill chunk (all layers' buffers are
    freed between layers, so one layer's worth) plus decode-side logits and sampling buffers."""
    h, w, kv = cfg.hidden_size, cfg.attn_width, cfg.kv_width
    moe = cfg.num_experts_per_tok * cfg.intermediate_size
    per_token = (dtype_bytes * (8 * h + 6 * w + 2 * kv + 4 * moe)   # hidden states, qkv, gate, experts
                 + 4 * (4 * w + 2 * moe + cfg.num_local_experts * 2))  # fp32 copies, routing
    block = min(cfg.block_size, 256)
    intra = 4 * cfg.num_attention_heads * block * 3  # lightning intra-block scores per token (fp32)
    logits = 4 * cfg.vocab_size * max_batch * 4      # fp32 logits, softmax, sort buffers
    return prefill_chunk * (per_token + intra) + logits


def _fixed_costs(cfg, free_bytes, max_context, dtype, weights_loaded, prefill_chunk, max_seqs,
                 utilization, margin_bytes):
    """What every plan subtracts before sequences: (bytes per element, budget, weights, prefill
    chunk, activations, fixed per-sequence state). Refuses a context past the model's."""
    if max_context > cfg.max_position_embeddings:
        raise ValueError(f"max_context {max_context:,} exceeds the model's "
                         f"max_position_embeddings {cfg.max_position_embeddings:,}")
    nbytes = DTYPE_BYTES[dtype]
    budget = int(free_bytes * utilization)
    weights = 0 if weights_loaded else int(cfg.weight_bytes(nbytes))
    chunk = min(prefill_chunk, max_context)
    act = activation_bytes(cfg, chunk, max_seqs, nbytes) + margin_bytes
    state = cfg.lightning_state_bytes() + cfg.sliding_cache_bytes(nbytes)  # fixed per sequence
    return nbytes, budget, weights, chunk, act, state


def plan_memory(cfg: ModelConfig, free_bytes: int, max_context: int, *, dtype: str = "bfloat16",
                weights_loaded: bool = True, prefill_chunk: int = 8192, max_slots: int = 256,
                utilization: float = 0.9, margin_bytes: int = GiB // 2,
                prefix_cache_bytes: int = 0) -> MemoryPlan:
    """Slots of `max_context` tokens that fit in `free_bytes` (free device memory; when the
    weights are not on the device yet pass weights_loaded=False to count them) beside a prefix
    cache of `prefix_cache_bytes`."""
    if max_context <= 0:
        raise ValueError(f"max_context must be positive, got {max_context}")
    nbytes, budget, weights, chunk, act, state = _fixed_costs(
        cfg, free_bytes, max_context, dtype, weights_loaded, prefill_chunk, max_slots,
        utilization, margin_bytes)
    kv = cfg.kv_cache_bytes_per_token(nbytes) * max_context
    room = budget - weights - act - prefix_cache_bytes
    slots = min(max_slots, room // (state + kv) - 1) if room > 0 else 0
    if slots < 1:
        need = weights + act + prefix_cache_bytes + 2 * (state + kv)
        raise ValueError(f"one sequence of {max_context:,} tokens does not fit: needs about "
                         f"{need / GiB:.2f} GiB, the budget is {budget / GiB:.2f} GiB "
                         f"({utilization:.0%} of {free_bytes / GiB:.2f} GiB free); lower "
                         f"--max-context, --max-num-batched-tokens or --prefix-cache-gb")
    return MemoryPlan(max_context, int(slots), chunk, budget, weights, act, state, kv,
                      prefix_cache_bytes)


def fits_table(cfg: ModelConfig, gpu_bytes: int, contexts: list[int], *, dtype: str | None = None,
               prefill_chunk: int = 16384, utilization: float = 0.9) -> str:
    """What `serve` can hold on a GPU of `gpu_bytes` (weights included), per max context."""
    dtype = dtype or (cfg.dtype if cfg.dtype in DTYPE_BYTES else "bfloat16")
    weights = cfg.weight_bytes(DTYPE_BYTES[dtype])
    lines = [f"Serving on one GPU of {gpu_bytes / GiB:.0f} GiB ({dtype} weights "
             f"{weights / GiB:.2f} GiB, {utilization:.0%} usable, prefill chunk {prefill_chunk})",
             f"  {'max context':>12}  {'sequences':>9}  {'K/V per seq':>12}  "
             f"{'state per seq':>13}  {'cache pool':>10}"]
    for ctx in contexts:
        try:
            p = plan_memory(cfg, gpu_bytes, ctx, dtype=dtype, weights_loaded=False,
                            prefill_chunk=prefill_chunk, utilization=utilization)
            lines.append(f"  {ctx:>12,}  {p.num_slots:>9}  {p.kv_bytes_per_slot / GiB:>8.3f} GiB  "
                         f"{p.state_bytes_per_slot / GiB:>9.3f} GiB  {p.pool_bytes / GiB:>6.1f} GiB")
        except ValueError:
            lines.append(f"  {ctx:>12,}  {'0':>9}  (does not fit)")
    return "\n".join(lines)


# ---------------------------------------------------------------------- several GPUs, 8-bit
RUNTIME_BYTES = GiB          # CUDA context, cuBLAS/Triton workspaces, CUDA-graph pools
NCCL_BYTES = GiB             # NCCL buffers per GPU when tensor parallel
ALLREDUCE_US = 10.0          # one small all-reduce across the NVLink island (decode), assumed
PLAN_CONTEXTS = (8192, 131072, 1048576, 4194304)
PLAN_BATCHES = (1, 16, 64)


def rank_weight_bytes(cfg: ModelConfig, tp: int, quantization=None, dtype_bytes: int = 2,
                      expert_parallel: bool = False) -> dict:
    """Bytes of the weights the largest rank holds under the tensor-parallel plan
    (parallel/tp_plan.py), with `quantization` ("int8" | "fp8" | None) as the loader stores them:
    8-bit tensors 1 byte a weight plus fp32 scales, the rest `dtype_bytes`. Also splits them
    into what a decode step reads: 'dense' (attention, router, norms: every step), 'lm_head',
    'expert' (all experts) and 'per_expert' (one expert id over all layers)."""
    import math

    import torch

    from ..checkpoint.match import param_shapes_of
    from ..model import MiniMaxForCausalLM
    from ..parallel.tp_plan import rank_shapes, tp_plan
    from ..quant import quantize_on_meta, quantized_tensors, resolve

    qc = resolve(quantization)
    with torch.device("meta"):
        model = MiniMaxForCausalLM(cfg)
        if qc is not None:
            quantize_on_meta(model, qc)
    shapes = param_shapes_of(model)
    if cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
    eight = set(quantized_tensors(cfg, qc)) if qc is not None else set()
    worst = None
    for rank in (0, tp - 1):  # the last rank may hold fewer vocab rows; all others are rank 0's
        parts = rank_shapes(shapes, tp_plan(shapes, cfg, tp, rank, expert_parallel))
        out = {"total": 0, "dense": 0, "expert": 0, "lm_head": 0}
        for name, shape in parts.items():
            per = 1 if name in eight else 4 if name.endswith("_scale") else dtype_bytes
            n = math.prod(shape) * per
            if not (cfg.tie_word_embeddings and name == "lm_head.weight"):
                out["total"] += n
            if ".mlp.experts." in name:
                out["expert"] += n
            elif name == "lm_head.weight":
                out["lm_head"] += n
            elif name != "model.embed_tokens.weight":  # decode reads one embedding row
                out["dense"] += n
        if worst is None or out["total"] > worst["total"]:
            worst = out
    experts_per_rank = cfg.num_local_experts // tp if expert_parallel else cfg.num_local_experts
    worst["per_expert"] = worst["expert"] // experts_per_rank  # one expert id, all layers
    return worst


def expected_experts(cfg: ModelConfig, tokens: int) -> float:
    """Distinct experts a layer touches for `tokens` tokens routed uniformly at random (distinct
    sequences; identical ones would all pick the same two)."""
    e, k = cfg.num_local_experts, cfg.num_experts_per_tok
    return e * (1 - (1 - k / e) ** tokens)


@dataclass
class ClusterPlan:
    """Memory per GPU and what fits, for `gpus` GPUs of `gpu_bytes` each (info --gpus)."""

    preset: str
    gpus: int
    tensor_parallel: int
    replicas: int
    quantization: str
    gpu_bytes: int
    budget_bytes: int
    weights_bytes: int
    activation_bytes: int
    runtime_bytes: int
    state_bytes_per_seq: int
    kv_bytes_per_token: int
    prefill_chunk: int
    max_context: dict              # sequences -> longest context each of them can hold
    sequences: dict                # context -> sequences per replica
    decode_ms: dict                # "batch@context" -> predicted step (ms), bandwidth floor
    allreduces_per_step: int
    bandwidth_tb_s: float | None
    notes: list

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.weights_bytes - self.activation_bytes - self.runtime_bytes

    def to_json(self) -> dict:
        out = dict(self.__dict__)
        out["gib_per_gpu"] = {k: round(v / GiB, 3) for k, v in (
            ("gpu", self.gpu_bytes), ("budget", self.budget_bytes),
            ("weights", self.weights_bytes), ("activations", self.activation_bytes),
            ("runtime", self.runtime_bytes), ("cache_pool", max(self.free_bytes, 0)))}
        return out

    def table(self) -> str:
        q = self.quantization
        lines = [f"Serving on {self.gpus} GPU(s) of {self.gpu_bytes / GiB:.4g} GiB: tensor parallel "
                 f"{self.tensor_parallel} x {self.replicas} replica(s), weights {q}",
                 "  per GPU:"]
        for label, v in (("weights", self.weights_bytes),
                         (f"activations + prefill workspace (chunk {self.prefill_chunk:,})",
                          self.activation_bytes),
                         ("CUDA context, workspaces" + (", NCCL" if self.tensor_parallel > 1 else ""),
                          self.runtime_bytes),
                         (f"usable ({self.budget_bytes / self.gpu_bytes:.0%} of the GPU)",
                          self.budget_bytes),
                         ("left for the cache pool", self.free_bytes)):
            lines.append(f"    {label:<52} {v / GiB:9.2f} GiB")
        lines.append(f"    {'lightning state per sequence (any length)':<52} "
                     f"{self.state_bytes_per_seq / 2**20:9.1f} MiB")
        lines.append(f"    {'softmax K/V per token':<52} {self.kv_bytes_per_token / 1024:9.2f} KiB")
        lines.append("  longest context:")
        for n, ctx in self.max_context.items():
            lines.append(f"    {n:>3} sequence(s) per replica: {ctx:>12,} tokens")
        lines.append("  sequences per replica at:")
        for ctx, n in self.sequences.items():
            lines.append(f"    {ctx:>12,} tokens: {n}")
        if self.decode_ms:
            lines.append(f"  decode step, bandwidth floor at {self.bandwidth_tb_s} TB/s per GPU "
                         f"(+ {self.allreduces_per_step} all-reduces x {ALLREDUCE_US:g} us):")
            for key, ms in self.decode_ms.items():
                lines.append(f"    batch {key}: {ms:8.2f} ms")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def plan_cluster(cfg: ModelConfig, gpus: int, gpu_bytes: int, *, quantization=None,
                 tensor_parallel: int | None = None, dtype: str = "bfloat16",
                 prefill_chunk: int = 16384, utilization: float = 0.9, max_slots: int = 256,
                 contexts=PLAN_CONTEXTS, batches=PLAN_BATCHES, bandwidth_tb_s: float | None = None,
                 preset: str = "") -> ClusterPlan:
    """Plan `gpus` GPUs of `gpu_bytes`: tensor parallel `tensor_parallel` (default: all GPUs) and
    gpus / tp data-parallel replicas. ValueError that says exactly why when nothing fits."""
    from ..parallel.tp_plan import tp_shape

    if gpus < 1 or gpu_bytes <= 0:
        raise ValueError(f"--gpus and --gpu-memory must be positive, got {gpus} and "
                         f"{gpu_bytes / GiB:g} GiB")
    tp = tensor_parallel or gpus
    if gpus % tp:
        raise ValueError(f"--tensor-parallel {tp} does not divide --gpus {gpus}")
    s = tp_shape(cfg, tp)
    nbytes = DTYPE_BYTES[dtype]
    q = quantization if quantization not in (None, "none") else None
    w = rank_weight_bytes(cfg, tp, q, nbytes)
    budget = int(gpu_bytes * utilization)
    runtime = RUNTIME_BYTES + (NCCL_BYTES if tp > 1 else 0)
    local = cfg.replace(num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                        intermediate_size=s.intermediate, vocab_size=s.vocab)
    act = activation_bytes(local, prefill_chunk, max_slots, nbytes) + GiB // 2
    state = local.lightning_state_bytes() + local.sliding_cache_bytes(nbytes)
    kv_tok = local.kv_cache_bytes_per_token(nbytes)  # 0 without full softmax layers
    room = budget - w["total"] - act - runtime
    label = q or dtype
    if room <= state:
        need = w["total"] + act + runtime + 2 * state
        raise ValueError(
            f"does not fit: {label} weights need {w['total'] / GiB:.1f} GiB per GPU under tensor "
            f"parallel {tp} (plus {(act + runtime) / GiB:.1f} GiB activations and runtime, "
            f"{need / GiB:.1f} GiB in all) but a GPU has {budget / GiB:.1f} GiB usable "
            f"({utilization:.0%} of {gpu_bytes / GiB:.4g} GiB); use more GPUs"
            + ("" if q else " or --quantization int8"))
    cap = cfg.max_position_embeddings
    max_context = {}
    for n in (1, 8):
        per = room // (n + 1) - state  # n sequences + the engine's scratch slot
        max_context[n] = (int(min(cap, per // kv_tok)) if kv_tok else cap) if per > 0 else 0
    sequences = {c: int(max(0, min(max_slots, room // (state + kv_tok * c) - 1))) for c in contexts}
    notes = []
    if max_context[1] == cap:
        notes.append(f"contexts are capped at max_position_embeddings {cap:,}")
    if max_context[8] < 1 << 20:
        notes.append("fewer than 8 sequences of 1M tokens fit per replica")
    if cfg.num_sliding_layers:
        notes.append(f"the state per sequence includes the {cfg.num_sliding_layers} sliding-window "
                     f"layers' K/V (window {cfg.sliding_window}); `serve` refuses sliding_attention "
                     f"layers for now")
    decode = {}
    allreduces = 2 * cfg.num_hidden_layers + 1 if tp > 1 else 0  # attention, MoE; logits gather
    if bandwidth_tb_s:
        for b in batches:
            c = 8192
            step = (w["dense"] + w["lm_head"] + expected_experts(cfg, b) * w["per_expert"]
                    + b * c * kv_tok + 2 * b * state)  # K/V read; states read and written
            decode[f"{b}@{c}"] = step / (bandwidth_tb_s * 1e12) * 1e3 + allreduces * ALLREDUCE_US / 1e3
    return ClusterPlan(preset, gpus, tp, gpus // tp, label, gpu_bytes, budget, w["total"], act,
                       runtime, state, kv_tok, prefill_chunk, max_context, sequences, decode,
                       allreduces, bandwidth_tb_s, notes)


# ---------------------------------------------------------------------- paged K/V (issue 18)
@dataclass
class PagedPlan:
    """Memory of a paged cache: `num_seqs` lightning-state rows (+ 1 scratch) and `num_pages`
    K/V pages of `page_size` tokens (page 0 the null page, infer/pool.py), so sequences take
    pages for their actual lengths instead of a `max_context` reservation each."""

    max_context: int
    num_seqs: int
    page_size: int
    num_pages: int
    prefill_chunk: int
    budget_bytes: int
    weights_bytes: int
    activation_bytes: int
    state_bytes_per_seq: int
    page_bytes: int              # one page of every softmax layer's K and V (0: none to page)

    @property
    def token_capacity(self) -> int:
        """K/V tokens the usable pages hold, over all sequences together."""
        return (self.num_pages - 1) * self.page_size

    @property
    def pool_bytes(self) -> int:
        return (self.num_seqs + 1) * self.state_bytes_per_seq + self.num_pages * self.page_bytes

    def pages_for(self, length: int) -> int:
        from .pool import pages_for

        return pages_for(length, self.page_size)

    def sequences_that_fit(self, lengths) -> int:
        """How many of `lengths` (actual tokens each, taken in order) fit at once."""
        free, n = self.num_pages - 1, 0
        for length in lengths:
            need = self.pages_for(length) if self.page_bytes else 0
            if n == self.num_seqs or need > free or length > self.max_context:
                break
            free -= need
            n += 1
        return n


def page_bytes(cfg: ModelConfig, page_size: int, dtype_bytes: int) -> int:
    """Bytes of one page over all softmax layers (K and V)."""
    return cfg.kv_cache_bytes_per_token(dtype_bytes) * page_size


def plan_paged(cfg: ModelConfig, free_bytes: int, max_context: int, *, page_size: int = 16,
               dtype: str = "bfloat16", weights_loaded: bool = True, prefill_chunk: int = 8192,
               max_seqs: int = 256, utilization: float = 0.9,
               margin_bytes: int = GiB // 2) -> PagedPlan:
    """Split the budget into state rows for up to `max_seqs` sequences and K/V pages: as many
    rows as leave pages for at least one `max_context`-token sequence. ValueError when not
    even one sequence of `max_context` tokens fits."""
    if max_context <= 0 or page_size <= 0 or max_seqs <= 0:
        raise ValueError(f"max_context, page_size and max_seqs must be positive, got "
                         f"{max_context}, {page_size} and {max_seqs}")
    nbytes, budget, weights, chunk, act, state = _fixed_costs(
        cfg, free_bytes, max_context, dtype, weights_loaded, prefill_chunk, max_seqs,
        utilization, margin_bytes)
    pbytes = page_bytes(cfg, page_size, nbytes)  # 0 without softmax layers: nothing to page
    room = budget - weights - act
    need_pages = -(-max_context // page_size) + 1 if pbytes else 0  # one sequence + the null page
    seqs = min(max_seqs, (room - need_pages * pbytes) // state - 1) if state else max_seqs
    if room <= 0 or seqs < 1:
        need = weights + act + 2 * state + need_pages * pbytes
        raise ValueError(f"one sequence of {max_context:,} tokens does not fit: needs about "
                         f"{need / GiB:.2f} GiB, the budget is {budget / GiB:.2f} GiB "
                         f"({utilization:.0%} of {free_bytes / GiB:.2f} GiB free); lower "
                         f"--max-context or --prefill-chunk")
    pages = int((room - (seqs + 1) * state) // pbytes) if pbytes else 2
    return PagedPlan(max_context, int(seqs), page_size, max(pages, 2), chunk, budget, weights,
                     act, state, pbytes)


def paged_fits_table(cfg: ModelConfig, gpu_bytes: int, contexts: list[int], *,
                     dtype: str | None = None, page_size: int = 16, prefill_chunk: int = 16384,
                     utilization: float = 0.9) -> str:
    """What a paged cache planned for the longest of `contexts` holds on a GPU of `gpu_bytes`
    (weights included): sequences of each actual length, against a slot pool for that longest
    context, which reserves it for every sequence (fits_table)."""
    dtype = dtype or (cfg.dtype if cfg.dtype in DTYPE_BYTES else "bfloat16")
    longest = max(contexts)
    lines = [f"Paged K/V ({page_size}-token pages, planned for contexts up to {longest:,}):"]
    try:
        p = plan_paged(cfg, gpu_bytes, longest, page_size=page_size, dtype=dtype,
                       weights_loaded=False, prefill_chunk=prefill_chunk, utilization=utilization)
    except ValueError as e:
        return "\n".join(lines + [f"  does not fit: {e}"])
    lines.append(f"  {p.num_seqs} state rows, {p.num_pages - 1:,} pages = {p.token_capacity:,} "
                 f"K/V tokens over all sequences, cache pool {p.pool_bytes / GiB:.1f} GiB")
    try:
        slots = plan_memory(cfg, gpu_bytes, longest, dtype=dtype, weights_loaded=False,
                            prefill_chunk=prefill_chunk, utilization=utilization).num_slots
    except ValueError:
        slots = 0
    lines.append(f"  {'length':>12}  {'sequences':>9}  (a slot pool for max context {longest:,} "
                 f"holds {slots} of any length)")
    for ctx in contexts:
        lines.append(f"  {ctx:>12,}  {p.sequences_that_fit([ctx] * p.num_seqs):>9}")
    return "\n".join(lines)
