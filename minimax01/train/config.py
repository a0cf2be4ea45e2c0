"""The schema of a training run's configuration: one dataclass per section (`[model]`
ModelPresetConfig, `[data]` DataConfig, `[optim]` OptimConfig, `[train]` TrainConfig, `[parallel]`
ParallelConfig) and RunConfig, which holds them and checks their values (`validate`).

This module only says what a config is. Reading one (TOML files, `--section.key value`
overrides, value coercion) is config_io.py; the named run presets are presets.py."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..config import ModelConfig
from ..dtypes import FLOAT_DTYPES
from ..parallel.world import ParallelConfig
from .precision import CAST_WEIGHTS
from .presets import STAGE_PRESETS
from .recompute import RECOMPUTE

SECTIONS = ("model", "data", "optim", "train", "parallel")
SCHEDULES = ("wsd", "cosine", "linear", "constant")
DATA_FORMATS = ("auto", "text", "jsonl", "parquet", "arrow", "chat")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


@dataclass
class ModelPresetConfig:
    """`[model]`: a model preset with any ModelConfig field overridden (`preset = "1b"`,
    `num_hidden_layers = 8`). `preset = ""` builds from the fields alone."""

    preset: str = "demo"
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def is_vl(self) -> bool:
        from ..vision.config import VL_PRESETS

        return self.preset in VL_PRESETS

    def build(self) -> ModelConfig:
        """The ModelConfig; changing the layer count re-derives layer_types and the alphas. A
        VL preset (vl-debug, ...) gives its language model's config (train/vl_train.py)."""
        if self.is_vl:
            from ..vision.config import VLConfig

            return VLConfig.from_preset(self.preset).text_config.replace(**self.fields)
        if self.preset:
            return ModelConfig.from_preset(self.preset).replace(**self.fields)
        return ModelConfig.from_dict(dict(self.fields))


@dataclass
class DataConfig:
    """`[data]`: where documents come from and how they become tokens."""

    source: str = "stdlib"          # "stdlib", "synthetic", or a path (file or folder)
    format: str = "auto"            # auto | text | jsonl | parquet | arrow (HF save_to_disk folder)
    #                                 | chat (JSONL of {"messages": [...]}: assistant tokens only)
    chat_template: str = ""         # chat: a Jinja file (default the tokenizer's, else Text-01's)
    text_field: str = "text"        # the column / JSON key holding a document's text
    tokenizer: str = "byte"         # "byte" or a tokenizer.json (or a folder holding one)
    add_bos: bool = True            # start every document with the tokenizer's BOS id
    add_eos: bool = True            # end every document with the tokenizer's EOS id
    shuffle: bool = True            # shuffle file order each epoch (seeded by train.seed)
    eval_fraction: float = 0.02     # share of documents (or 4 KiB text pieces) held out
    synthetic_tasks: list[str] = field(default_factory=lambda: ["passkey", "needle", "mqar"])
    synthetic_length: int = 0       # characters per synthetic document; 0: about seq_len tokens
    strict: bool = False            # a malformed JSONL line is an error (default: skipped, counted)
    length_mixture: list[list[float]] = field(default_factory=list)  # [[lo, hi, weight]] tokens


@dataclass
class OptimConfig:
    """`[optim]`: AdamW with decoupled weight decay (none on norms and embeddings) and an LR
    schedule."""

    lr: float = 3e-4
    min_lr_ratio: float = 0.1       # final LR = lr * min_lr_ratio
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    schedule: str = "wsd"           # wsd (warmup-stable-decay) | cosine | linear | constant
    warmup_steps: int = 100
    decay_fraction: float = 0.2     # wsd: share of the steps spent decaying at the end
    grad_clip: float = 1.0          # max global gradient norm; 0 disables clipping
    batch_warmup_tokens: list[float] = field(default_factory=list)  # batch doubles at each count


OBJECTIVES = ("lm", "dpo", "grpo")
DPO_REFERENCES = ("model", "precomputed")
RL_CLIPS = ("ppo", "paper", "none")
RL_KLS = ("none", "k1", "k3", "paper", "paper_prob")
RL_AGGREGATES = ("token", "sequence")


@dataclass
class DPOConfig:
    """`[train.dpo]`: direct preference optimisation (train/post/dpo.py)."""

    beta: float = 0.1
    label_smoothing: float = 0.0    # conservative DPO: the share of flipped preference labels
    reference: str = "model"        # model (a frozen copy) | precomputed (a sidecar of log-probs)


@dataclass
class RLConfig:
    """`[train.rl]`: online RL with GRPO (train/post/grpo.py, train/post/rl_trainer.py)."""

    prompts: str = "addition"       # "addition" (the synthetic task) or a JSONL of prompt/answer
    verifier: str = "exact_match"   # built-in name or module:function(prompt, completion, answer)
    group_size: int = 8             # rollouts per prompt (G)
    prompts_per_step: int = 8       # prompts per rollout batch
    minibatches: int = 1            # optimizer steps per rollout batch
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    clip: str = "paper"             # ppo | paper (ppo + drop ratio > ratio_drop with A < 0) | none
    clip_low: float = 0.2
    clip_high: float = 0.2
    ratio_drop: float = 3.0         # the paper's extra clipping: tokens above it with A < 0
    kl: str = "paper"               # none | k1 | k3 (GRPO) | paper (sg(log p - log ref) log p)
    kl_coef: float = 0.01           #   | paper_prob (sg(p - p_ref) log p, token probabilities)
    adv_std: bool = True            # divide group-centred rewards by the group's std
    balance: bool = False           # equal positive and negative advantage mass over tokens
    pass_rate: list[float] = field(default_factory=lambda: [0.0, 1.0])  # keep groups within
    aggregate: str = "token"        # token (mean over all tokens) | sequence (GRPO's per-seq)
    eval_prompts: int = 32          # held-out prompts for greedy eval_reward


LORA_TARGETS = ("qkv_proj", "output_gate", "out_proj",   # lightning attention
                "q_proj", "k_proj", "v_proj", "o_proj",   # softmax attention
                "gate")                                    # the MoE router (not by default)


@dataclass
class LoraConfig:
    """`[train.lora]`: low-rank adapters on the attention projections (train/lora.py); only the
    adapters train. rank 0: no adapters (full fine-tuning)."""

    rank: int = 0
    alpha: float = 16.0             # the update is (alpha / rank) * B @ A
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS[:-1]))


@dataclass
class TrainConfig:
    """`[train]`: the loop: how long, how big, where to write, how often to log / evaluate /
    save."""

    steps: int = 1000
    batch_size: int = 8             # rows per micro-batch, summed over data-parallel ranks
    seq_len: int = 1024             # tokens per row
    grad_accum: int = 1             # micro-batches per optimizer step (at full batch size)
    seed: int = 0
    stages: list[dict[str, Any]] | str = field(default_factory=list)  # tables or a STAGE_PRESETS name
    dtype: str = "bfloat16"         # autocast dtype: bfloat16 | float32 (master weights stay fp32)
    device: str = "auto"            # auto | cpu | cuda | cuda:N (single process)
    out_dir: str = "runs/default"
    save_every: int = 500           # 0: only at the end (and on SIGTERM/SIGINT)
    keep_last: int = 3
    log_every: int = 10
    eval_every: int = 200           # 0: no periodic held-out loss (still once at the end)
    eval_batches: int = 4           # micro-batches of held-out data per evaluation
    activation_checkpointing: bool = False  # the earlier spelling of recompute = "full"
    recompute: str = "none"         # none | full | attention | moe (train/recompute.py)
    cast_weights: str = "per_use"   # per_use (autocast over fp32) | per_step: matrices cast to
                                    # train.dtype once per optimizer step, fp32 masters
                                    # (train/precision.py; one process)
    compile: bool = False           # torch.compile every decoder layer
    loss_chunk_size: int = 0        # >0: chunked lm_head + cross entropy (long sequences)
    max_bad_steps: int = 5          # consecutive non-finite steps before the run stops
    progress: bool = True           # tqdm bar (plain log lines when stderr is not a terminal)
    tensorboard: bool = True        # write out_dir/tb when tensorboard is installed
    export: bool = True             # write out_dir/model (HF format + tokenizer) at the end
    freeze: str = ""                # VL runs: a stage (stage1..3) or parts (train/vl_train.py)
    sample_prompt: str = "def "
    sample_tokens: int = 200        # 0: no sample at the end
    objective: str = "lm"           # lm (next-token) | dpo | grpo (docs/post_training.md)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    init_from: str = ""             # an HF-format checkpoint folder to fine-tune (train/init_from.py)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class RunConfig:
    """A whole training run: the five sections."""

    model: ModelPresetConfig = field(default_factory=ModelPresetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Section -> key -> value, as a TOML file holds them (`[model]` flattened)."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        model = out["model"]
        out["model"] = {"preset": model["preset"], **model["fields"]}
        return out

    # ------------------------------------------------------------------ checks
    def validate(self) -> ModelConfig:
        """Check every section; returns the model config. Raises ValueError naming the key.
        `train.stages` is checked for its form here; each stage's own config (the overrides
        applied) by `minimax01.train.stages.check_run`, which the train command runs."""
        if self.train.init_from:  # the architecture is the checkpoint's
            from .init_from import check_model_fields, checkpoint_config

            model = check_model_fields(checkpoint_config(self.train.init_from),
                                       self.model.preset, self.model.fields,
                                       ModelPresetConfig.preset)
        else:
            model = self.model.build()
        _check_train(self.train, model, self.model.is_vl)
        if self.train.cast_weights == "per_step" and not self.parallel.degrees_are_one():
            raise ValueError("train.cast_weights = per_step is for one process; under FSDP set "
                             "parallel.param_dtype = bfloat16 (the all-gather casts the shards)")
        _check_data(self.data)
        _check_optim(self.optim, self.train)
        return model


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def _check_train(t: TrainConfig, model: ModelConfig, vl: bool = False) -> None:
    for name in ("steps", "batch_size", "seq_len", "grad_accum", "keep_last", "log_every",
                 "eval_batches"):
        if getattr(t, name) <= 0:
            raise ValueError(f"train.{name} must be positive, got {getattr(t, name)}")
    for name in ("save_every", "eval_every", "loss_chunk_size", "max_bad_steps", "sample_tokens"):
        if getattr(t, name) < 0:
            raise ValueError(f"train.{name} must be >= 0, got {getattr(t, name)}")
    if t.seq_len < 2:
        raise ValueError(f"train.seq_len must be at least 2, got {t.seq_len}")
    if t.seq_len > model.max_position_embeddings:
        raise ValueError(f"train.seq_len={t.seq_len} exceeds the model's "
                         f"max_position_embeddings={model.max_position_embeddings}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"train.dtype must be bfloat16, float16 or float32, got {t.dtype!r}")
    if t.recompute not in RECOMPUTE:
        raise ValueError(f"train.recompute must be one of {', '.join(RECOMPUTE)}, "
                         f"got {t.recompute!r}")
    if t.activation_checkpointing and t.recompute not in ("none", "full"):
        raise ValueError(f"train.activation_checkpointing = true (recompute every layer) "
                         f"contradicts train.recompute = {t.recompute!r}; set only recompute")
    if t.cast_weights not in CAST_WEIGHTS:
        raise ValueError(f"train.cast_weights must be one of {', '.join(CAST_WEIGHTS)}, "
                         f"got {t.cast_weights!r}")
    if t.cast_weights == "per_step" and t.dtype == "float32":
        raise ValueError("train.cast_weights = per_step needs a low-precision train.dtype "
                         "(bfloat16 or float16), got float32")
    if not _DEVICE.fullmatch(t.device):
        raise ValueError(f"train.device must be auto, cpu, cuda or cuda:N, got {t.device!r}")
    if not t.out_dir.strip():
        raise ValueError("train.out_dir must not be empty")
    _check_lora(t.lora)
    if t.freeze and not vl:
        raise ValueError("train.freeze: only VL model presets have parts to freeze "
                         "(model.preset = vl-debug, ...; see docs/vision.md)")
    if isinstance(t.stages, str):
        if t.stages and t.stages not in STAGE_PRESETS:
            raise ValueError(f"train.stages: unknown preset {t.stages!r}; available: "
                             f"{', '.join(STAGE_PRESETS)}")
    elif not all(isinstance(stage, dict) for stage in t.stages):
        raise ValueError("train.stages must be a list of tables (one per stage) or a preset name")
    _choice("train.objective", t.objective, OBJECTIVES)
    _check_dpo(t.dpo)
    _check_rl(t.rl)


def _choice(name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(options)}, got {value!r}")


def _check_dpo(d: DPOConfig) -> None:
    if not (math.isfinite(d.beta) and d.beta > 0):
        raise ValueError(f"train.dpo.beta must be a positive finite number, got {d.beta}")
    if not 0.0 <= d.label_smoothing < 0.5:
        raise ValueError(f"train.dpo.label_smoothing must be in [0, 0.5), got {d.label_smoothing}")
    _choice("train.dpo.reference", d.reference, DPO_REFERENCES)


def _check_rl(r: RLConfig) -> None:
    for name in ("group_size", "prompts_per_step", "minibatches", "max_new_tokens"):
        if getattr(r, name) <= 0:
            raise ValueError(f"train.rl.{name} must be positive, got {getattr(r, name)}")
    if r.group_size < 2:
        raise ValueError(f"train.rl.group_size must be at least 2 (advantages are relative to "
                         f"the group), got {r.group_size}")
    if r.prompts_per_step % r.minibatches:
        raise ValueError(f"train.rl.prompts_per_step={r.prompts_per_step} must be a multiple of "
                         f"train.rl.minibatches={r.minibatches}")
    _choice("train.rl.clip", r.clip, RL_CLIPS)
    _choice("train.rl.kl", r.kl, RL_KLS)
    _choice("train.rl.aggregate", r.aggregate, RL_AGGREGATES)
    for name in ("temperature", "clip_low", "clip_high", "kl_coef"):
        value = getattr(r, name)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"train.rl.{name} must be a finite number >= 0, got {value}")
    if not 0 < r.top_p <= 1:
        raise ValueError(f"train.rl.top_p must be in (0, 1], got {r.top_p}")
    if not (math.isfinite(r.ratio_drop) and r.ratio_drop > 1):
        raise ValueError(f"train.rl.ratio_drop must be a finite number > 1, got {r.ratio_drop}")
    lo_hi = r.pass_rate
    if len(lo_hi) != 2 or not 0.0 <= lo_hi[0] <= lo_hi[1] <= 1.0:
        raise ValueError(f"train.rl.pass_rate must be [lo, hi] with 0 <= lo <= hi <= 1, "
                         f"got {lo_hi}")
    if r.eval_prompts < 0:
        raise ValueError(f"train.rl.eval_prompts must be >= 0, got {r.eval_prompts}")


def _check_lora(lora: LoraConfig) -> None:
    if lora.rank < 0:
        raise ValueError(f"train.lora.rank must be >= 0 (0: no LoRA), got {lora.rank}")
    if not (math.isfinite(lora.alpha) and lora.alpha > 0):
        raise ValueError(f"train.lora.alpha must be a positive number, got {lora.alpha}")
    bad = [t for t in lora.targets if t not in LORA_TARGETS]
    if bad:
        raise ValueError(f"train.lora.targets: unknown target {bad[0]!r}; choose among "
                         f"{', '.join(LORA_TARGETS)}")
    if lora.rank and not lora.targets:
        raise ValueError("train.lora.targets is empty: name at least one projection")


def _check_data(d: DataConfig) -> None:
    if d.format not in DATA_FORMATS:
        raise ValueError(f"data.format must be {', '.join(DATA_FORMATS[:-1])} or "
                         f"{DATA_FORMATS[-1]}, got {d.format!r}")
    if not 0.0 <= d.eval_fraction < 1.0:  # also refuses NaN
        raise ValueError(f"data.eval_fraction must be in [0, 1), got {d.eval_fraction}")
    if d.synthetic_length < 0:
        raise ValueError(f"data.synthetic_length must be >= 0, got {d.synthetic_length}")
    if d.length_mixture:
        check_mixture(d.length_mixture)
        if d.format == "chat":
            raise ValueError("data.length_mixture does not apply to data.format chat "
                             "(conversations are packed whole)")
    if d.chat_template and d.format != "chat":
        raise ValueError("data.chat_template is only read with data.format chat")


def check_mixture(spec, where: str = "data.length_mixture") -> list[tuple[float, float, float]]:
    """[[lo, hi, weight], ...] (document lengths in tokens, train/data/mixture.py) -> checked
    (lo, hi, weight) tuples: 0 <= lo < hi (hi may be inf), weight >= 0, one positive weight,
    no overlaps."""
    out = []
    for i, item in enumerate(spec):
        if not isinstance(item, (list, tuple)) or len(item) != 3:
            raise ValueError(f"{where}[{i}] must be [lo, hi, weight], got {item!r}")
        if any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in item):
            raise ValueError(f"{where}[{i}] must hold numbers, got {item!r}")
        lo, hi, w = (float(x) for x in item)
        if not (lo >= 0 and hi > lo and w >= 0 and math.isfinite(lo) and math.isfinite(w)):
            raise ValueError(f"{where}[{i}] = {list(item)}: need 0 <= lo < hi and weight >= 0")
        out.append((lo, hi, w))
    if not out or sum(w for *_, w in out) <= 0:
        raise ValueError(f"{where} needs at least one bucket with a positive weight")
    spans = sorted(out)
    for (_, hi_a, _), (lo_b, _, _) in zip(spans, spans[1:]):
        if lo_b < hi_a:
            raise ValueError(f"{where}: buckets overlap at {lo_b:g}")
    return out


def _check_optim(o: OptimConfig, t: TrainConfig) -> None:
    """Every optimizer value that could turn the weights non-finite is refused here, before
    anything is written (an lr of inf would otherwise train one NaN step and save it)."""
    if o.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule must be wsd, cosine, linear or constant, "
                         f"got {o.schedule!r}")
    if not (math.isfinite(o.lr) and o.lr > 0):
        raise ValueError(f"optim.lr must be a positive finite number, got {o.lr}")
    for name in ("beta1", "beta2"):
        value = getattr(o, name)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"optim.{name} must be in [0, 1), got {value}")
    if not (math.isfinite(o.eps) and o.eps > 0):
        raise ValueError(f"optim.eps must be a positive finite number, got {o.eps}")
    if not (math.isfinite(o.weight_decay) and o.weight_decay >= 0):
        raise ValueError(f"optim.weight_decay must be a finite number >= 0, got {o.weight_decay}")
    if not (math.isfinite(o.grad_clip) and o.grad_clip >= 0):
        raise ValueError(f"optim.grad_clip must be a finite number >= 0 (0 disables clipping), "
                         f"got {o.grad_clip}")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    if not 0.0 <= o.decay_fraction <= 1.0:
        raise ValueError(f"optim.decay_fraction must be in [0, 1], got {o.decay_fraction}")
    if o.warmup_steps < 0:
        raise ValueError(f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    marks = list(o.batch_warmup_tokens)
    for m in marks:
        _finite("optim.batch_warmup_tokens", m)
    if marks != sorted(marks) or any(m <= 0 for m in marks):
        raise ValueError(f"optim.batch_warmup_tokens must be increasing positive token "
                         f"counts, got {marks}")
    if marks and t.grad_accum % (2 ** len(marks)):
        raise ValueError(f"optim.batch_warmup_tokens has {len(marks)} doublings, so "
                         f"train.grad_accum must be a multiple of {2 ** len(marks)} "
                         f"(got {t.grad_accum}): the warm-up halves the micro-batches per step")
