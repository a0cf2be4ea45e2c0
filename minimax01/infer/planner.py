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
            ("lightning state per sequence (any length)", self.state_bytes_per_slot),
            (f"softmax K/V per sequence at {self.max_context:,} tokens", self.kv_bytes_per_slot),
            (f"cache pool: {self.num_slots} slots + 1 scratch", self.pool_bytes),
        ]
        width = max(len(r[0]) for r in rows)
        lines = [f"{name:<{width}}  {size / GiB:10.3f} GiB" for name, size in rows]
        lines.append(f"{'concurrent sequences at max context':<{width}}  {self.num_slots:10d}")
        lines.append(f"{'prefill chunk (tokens)':<{width}}  {self.prefill_chunk:10d}")
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


def plan_memory(cfg: ModelConfig, free_bytes: int, max_context: int, *, dtype: str = "bfloat16",
                weights_loaded: bool = True, prefill_chunk: int = 8192, max_slots: int = 256,
                utilization: float = 0.9, margin_bytes: int = GiB // 2) -> MemoryPlan:
    """Slots of `max_context` tokens that fit in `free_bytes` (free device memory; when the
    weights are not on the device yet pass weights_loaded=False to count them)."""
    if max_context <= 0:
        raise ValueError(f"max_context must be positive, got {max_context}")
    if max_context > cfg.max_position_embeddings:
        raise ValueError(f"max_context {max_context:,} exceeds the model's "
                         f"max_position_embeddings {cfg.max_position_embeddings:,}")
    nbytes = DTYPE_BYTES[dtype]
    budget = int(free_bytes * utilization)
    weights = 0 if weights_loaded else int(cfg.weight_bytes(nbytes))
    chunk = min(prefill_chunk, max_context)
    act = activation_bytes(cfg, chunk, max_slots, nbytes) + margin_bytes
    state = cfg.lightning_state_bytes()
    kv = cfg.kv_cache_bytes_per_token(nbytes) * max_context
    room = budget - weights - act
    slots = min(max_slots, room // (state + kv) - 1) if room > 0 else 0
    if slots < 1:
        need = weights + act + 2 * (state + kv)
        raise ValueError(f"one sequence of {max_context:,} tokens does not fit: needs about "
                         f"{need / GiB:.2f} GiB, the budget is {budget / GiB:.2f} GiB "
                         f"({utilization:.0%} of {free_bytes / GiB:.2f} GiB free); lower "
                         f"--max-context or --prefill-chunk")
    return MemoryPlan(max_context, int(slots), chunk, budget, weights, act, state, kv)


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
