"""Memory per GPU of a training or fine-tuning run (`info --train`): what a layout needs, and the
fewest GPUs that fit.

Counts come from the model itself, built on the meta device (with the LoRA adapters when asked),
so every parameter is counted once and by its real shape. The accounting follows what the
trainer does (train/trainer.py, parallel/fsdp.py, train/lora.py):

* **sharded state** (FSDP2 over the data ranks; experts over EP x ETP x EDP; replicated over
  dp_replicate): each GPU holds `dp_replicate / gpus` of every parameter. Full fine-tuning: fp32
  master weights (4 B), fp32 gradients (4 B), AdamW's two fp32 moments (8 B). LoRA: the frozen
  decoder-layer matrices in the autocast dtype (2 B), the rest of the base (norms, embeddings,
  lm_head) in fp32 (4 B), and only the adapters carry gradients and moments.
* **gathered working set** (only with more than one GPU): FSDP unshards the current decoder layer
  and prefetches the next (2 layers, each its dense part plus its experts / (EP x ETP)), in the
  weights' dtype (or parallel.param_dtype); full fine-tuning also holds one layer's unsharded
  fp32 gradients before the reduce-scatter; the root group (final norm, lm_head) stays gathered
  from forward to backward.
* **activations** per token, what autograd keeps under bf16 autocast (ACTIVATION_NOTES); with
  activation checkpointing (recompute "full") each layer keeps only its fp32 input and one
  layer at a time is recomputed (counted twice: its activations and their gradients); without,
  every layer keeps all of its activations. Tokens per GPU = rows x seq_len / cp.
* **loss**: bf16 logits, fp32 logits and their gradient for the loss chunk (train.loss_chunk_size;
  the whole micro-batch without chunking).
* **overhead**: a fixed allowance for the CUDA context, NCCL buffers and allocator fragmentation.

benchmarks/finetune_memory.py compares the prediction with the measured peak on one GPU."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from ..config import ModelConfig

GiB = 1024 ** 3
H200_GIB = 140.0   # nvidia-smi's 143771 MiB of the "141 GB" H200
OVERHEAD_GIB = 4.0
RECOMPUTE = ("full", "none")
ACTIVATION_NOTES = (
    "per layer: 20h (norm inputs/outputs in fp32, their bf16 casts); lightning 28W + H*d*d*4/B "
    "(qkv before/after SiLU, output, norm, gate, sigmoid, product; chunk states); softmax "
    "4(W+2KV) + 2W + 4H (q/k/v before/after RoPE, output, log-sum-exp); MoE 8E + k(8h+8I) "
    "(router probabilities, dispatched rows, gate_up, SiLU, product, down, combine)")


@dataclass
class ParamCounts:
    """Parameters of a model by how they are held."""

    layer_dense: list[int]        # per decoder layer: attention, norms, router (no experts)
    layer_experts: list[int]      # per decoder layer: the stacked experts
    embed: int
    root: int                     # final norm + lm_head (0 lm_head when tied)
    lora: int                     # adapter parameters (0 without LoRA)
    frozen_low: int               # LoRA: frozen decoder-layer matrices held in the autocast dtype

    @property
    def total(self) -> int:
        return sum(self.layer_dense) + sum(self.layer_experts) + self.embed + self.root


def count_parameters(cfg: ModelConfig, lora_rank: int = 0, lora_targets=()) -> ParamCounts:
    from ..model import MiniMaxForCausalLM
    from .lora import apply_lora

    with torch.device("meta"):
        model = MiniMaxForCausalLM(cfg)
    if lora_rank:
        apply_lora(model, lora_rank, 1.0, lora_targets)
    dense, experts, lora, low = [], [], 0, 0
    for layer in model.model.layers:
        d = e = 0
        for name, p in layer.named_parameters():
            if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B"):
                lora += p.numel()
                continue
            if ".experts." in f".{name}":
                e += p.numel()
            else:
                d += p.numel()
            if lora_rank and p.ndim >= 2:
                low += p.numel()
        dense.append(d)
        experts.append(e)
    embed = model.model.embed_tokens.weight.numel()
    root = model.model.norm.weight.numel() + (0 if cfg.tie_word_embeddings
                                               else model.lm_head.weight.numel())
    return ParamCounts(dense, experts, embed, root, lora, low)


def activation_bytes_per_token(cfg: ModelConfig, layer_type: str) -> float:
    """Bytes autograd keeps per token for one decoder layer (ACTIVATION_NOTES)."""
    h, w, kv, heads, d = (cfg.hidden_size, cfg.attn_width, cfg.kv_width, cfg.num_attention_heads,
                          cfg.head_dim)
    k, i, e = cfg.num_experts_per_tok, cfg.intermediate_size, cfg.num_local_experts
    moe = 8 * e + k * (8 * h + 8 * i)
    if layer_type == "linear_attention":
        attn = 28 * w + heads * d * d * 4 / cfg.block_size
    else:
        attn = 4 * (w + 2 * kv) + 2 * w + 4 * heads
    return 20 * h + attn + moe


@dataclass
class TrainPlan:
    mode: str                      # "full" | "lora"
    gpus: int
    ep: int
    etp: int
    cp: int
    dp_replicate: int
    tokens_per_gpu: int
    recompute: str
    parts: dict[str, float] = field(default_factory=dict)   # bytes per GPU
    gpu_memory: float = H200_GIB * GiB
    params: int = 0
    trainable: int = 0

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory

    def to_json(self) -> dict:
        out = asdict(self)
        out.update(total=self.total, fits=self.fits)
        return out


def check_layout(cfg: ModelConfig, gpus: int, ep: int, etp: int, cp: int, dp_replicate: int) -> None:
    for name, v in (("gpus", gpus), ("ep", ep), ("etp", etp), ("cp", cp),
                    ("dp_replicate", dp_replicate)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if cfg.num_local_experts % ep:
        raise ValueError(f"ep={ep} must divide the number of experts ({cfg.num_local_experts})")
    if cfg.intermediate_size % etp:
        raise ValueError(f"etp={etp} must divide the expert width ({cfg.intermediate_size})")
    for need, what in ((ep * etp * dp_replicate, "ep x etp x dp_replicate"),
                       (cp * dp_replicate, "cp x dp_replicate")):
        if gpus % need:
            raise ValueError(f"{gpus} GPU(s) is not a multiple of {what} = {need}")


def plan_training(cfg: ModelConfig, gpus: int, *, lora_rank: int = 0, lora_targets=(),
                  ep: int = 1, etp: int = 1, cp: int = 1, dp_replicate: int = 1,
                  tokens: int = 8192, recompute: str = "full", loss_chunk: int = 0,
                  param_dtype: str = "none", gpu_memory: float = H200_GIB * GiB,
                  overhead: float = OVERHEAD_GIB * GiB, counts: ParamCounts | None = None
                  ) -> TrainPlan:
    """Bytes per GPU of one training step. `tokens`: per data-parallel rank (rows x seq_len,
    split over its cp ranks); `loss_chunk` 0: the lm loss over the whole micro-batch at once."""
    check_layout(cfg, gpus, ep, etp, cp, dp_replicate)
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {recompute!r}")
    if tokens < 1 or loss_chunk < 0:
        raise ValueError("tokens must be positive and loss_chunk >= 0")
    lora = lora_rank > 0
    c = counts or count_parameters(cfg, lora_rank, lora_targets)
    share = dp_replicate / gpus            # of every parameter, on each GPU
    parts: dict[str, float] = {}
    if lora:
        base = c.total
        parts["weights"] = (c.frozen_low * 2 + (base - c.frozen_low) * 4 + c.lora * 4) * share
        parts["gradients"] = c.lora * 4 * share
        parts["optimizer"] = c.lora * 8 * share
    else:
        parts["weights"] = c.total * 4 * share
        parts["gradients"] = c.total * 4 * share
        parts["optimizer"] = c.total * 8 * share
    if gpus > 1:  # FSDP unshards a layer at a time (the next prefetched) and the root group
        gather = {"none": None, "float32": 4, "bfloat16": 2, "float16": 2}[param_dtype]
        per_layer = []
        for dense, experts in zip(c.layer_dense, c.layer_experts):
            n = dense + experts / (ep * etp)
            w = gather or (2 if lora else 4)
            per_layer.append(n * w + (0 if lora else n * 4))
        biggest = sorted(per_layer)[-2:]
        root_bytes = gather or 4
        parts["gathered"] = sum(biggest) + c.root * root_bytes * (1 if lora else 2)
    t = tokens / cp
    per_layer_act = [activation_bytes_per_token(cfg, lt) for lt in cfg.layer_types]
    if recompute == "full":
        act = len(per_layer_act) * 4 * cfg.hidden_size + 2 * max(per_layer_act)
    else:
        act = sum(per_layer_act)
    act += 4 * cfg.hidden_size * 2  # embedding output, final norm
    parts["activations"] = act * t
    chunk = min(loss_chunk or t, t)
    parts["loss"] = chunk * cfg.vocab_size * 10.0
    parts["overhead"] = float(overhead)
    trainable = c.lora if lora else c.total
    return TrainPlan("lora" if lora else "full", gpus, ep, etp, cp, dp_replicate, int(tokens),
                     recompute, parts, float(gpu_memory), c.total, trainable)


def min_gpus(cfg: ModelConfig, limit: int = 4096, **kw) -> TrainPlan | None:
    """The plan on the fewest GPUs (multiples the layout allows) that fits; None up to `limit`."""
    counts = kw.pop("counts", None) or count_parameters(cfg, kw.get("lora_rank", 0),
                                                        kw.get("lora_targets", ()))
    rep = kw.get("dp_replicate", 1)
    step = math.lcm(kw.get("ep", 1) * kw.get("etp", 1) * rep, kw.get("cp", 1) * rep)
    for gpus in range(step, limit + 1, step):
        plan = plan_training(cfg, gpus, counts=counts, **kw)
        if plan.fits:
            return plan
    return None

