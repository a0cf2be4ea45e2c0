"""The training run's configuration: five sections (`model`, `data`, `optim`, `train`,
`parallel`), TOML on disk, `--section.key value` overrides on the command line, and named presets.

Every key is checked: an unknown one is an error that names the closest valid key, a value of the
wrong type is an error that names the key and the value."""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import PRESETS as MODEL_PRESETS
from ..config import ModelConfig
from ..parallel.world import ParallelConfig

SECTIONS = ("model", "data", "optim", "train", "parallel")


@dataclass
class ModelSection:
    """A model preset, with any ModelConfig field overridden (`[model] preset = "1b"`,
    `num_hidden_layers = 8`). `preset = ""` builds from the fields alone."""

    preset: str = "demo"
    fields: dict[str, Any] = field(default_factory=dict)

    def build(self) -> ModelConfig:
        """The ModelConfig; changing the layer count re-derives layer_types and the alphas."""
        if self.preset:
            return ModelConfig.from_preset(self.preset).replace(**self.fields)
        return ModelConfig.from_dict(dict(self.fields))


@dataclass
class DataConfig:
    """Where documents come from and how they become tokens."""

    source: str = "stdlib"          # "stdlib", "synthetic", or a path (file or folder)
    format: str = "auto"            # auto | text | jsonl | parquet | arrow (HF save_to_disk folder)
    text_field: str = "text"        # the column / JSON key holding a document's text
    tokenizer: str = "byte"         # "byte" or a tokenizer.json (or a folder holding one)
    add_bos: bool = True            # start every document with the tokenizer's BOS id
    add_eos: bool = True            # end every document with the tokenizer's EOS id
    shuffle: bool = True            # shuffle file order each epoch (seeded by train.seed)
    eval_fraction: float = 0.02     # share of documents (or 4 KiB text pieces) held out
    synthetic_tasks: list[str] = field(default_factory=lambda: ["passkey", "needle", "mqar"])
    synthetic_length: int = 0       # characters per synthetic document; 0: about seq_len tokens
    length_mixture: list[list[float]] = field(default_factory=list)  # [[lo, hi, weight]] tokens


@dataclass
class OptimConfig:
    """AdamW with decoupled weight decay (none on norms and embeddings) and an LR schedule."""

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


@dataclass
class TrainSection:
    """The loop: how long, how big, where to write, how often to log / evaluate / save."""

    steps: int = 1000
    batch_size: int = 8             # rows per micro-batch, summed over data-parallel ranks
    seq_len: int = 1024             # tokens per row
    grad_accum: int = 1             # micro-batches per optimizer step (at full batch size)
    seed: int = 0
    stages: list[dict[str, Any]] | str = field(default_factory=list)  # train/stages.py
    dtype: str = "bfloat16"         # autocast dtype: bfloat16 | float32 (master weights stay fp32)
    device: str = "auto"            # auto | cpu | cuda | cuda:N (single process)
    out_dir: str = "runs/default"
    save_every: int = 500           # 0: only at the end (and on SIGTERM/SIGINT)
    keep_last: int = 3
    log_every: int = 10
    eval_every: int = 200           # 0: no periodic held-out loss (still once at the end)
    eval_batches: int = 4           # micro-batches of held-out data per evaluation
    activation_checkpointing: bool = False
    compile: bool = False           # torch.compile every decoder layer
    loss_chunk_size: int = 0        # >0: chunked lm_head + cross entropy (long sequences)
    max_bad_steps: int = 5          # consecutive non-finite steps before the run stops
    progress: bool = True           # tqdm bar (plain log lines when stderr is not a terminal)
    tensorboard: bool = True        # write out_dir/tb when tensorboard is installed
    export: bool = True             # write out_dir/model (HF format + tokenizer) at the end
    sample_prompt: str = "def "
    sample_tokens: int = 200        # 0: no sample at the end


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    # ------------------------------------------------------------------ dict / TOML
    def to_dict(self) -> dict[str, dict[str, Any]]:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        model = out["model"]
        out["model"] = {"preset": model["preset"], **model["fields"]}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        cfg = cls()
        cfg.update(data)
        return cfg

    def update(self, data: dict[str, Any]) -> None:
        for section, values in data.items():
            if section not in SECTIONS:
                raise ValueError(f"unknown config section {section!r}{_hint(section, SECTIONS)}")
            if not isinstance(values, dict):
                raise ValueError(f"config section [{section}] must be a table, got {values!r}")
            for key, value in values.items():
                self.set(f"{section}.{key}", value)

    def set(self, dotted: str, value: Any) -> None:
        """Set `section.key` to `value` (already parsed), checking the key and the type."""
        section, _, key = dotted.partition(".")
        if section not in SECTIONS:
            raise ValueError(f"unknown config section {section!r} in {dotted!r}"
                             f"{_hint(section, SECTIONS)}")
        if not key:
            raise ValueError(f"config key {dotted!r} needs the form section.key")
        if section == "model":
            names = ["preset"] + [f.name for f in dataclasses.fields(ModelConfig)]
            if key not in names:
                raise ValueError(f"unknown config key model.{key}{_hint(key, names, 'model.')}")
            if key == "preset":
                value = "" if value is None else str(value)
                if value and value not in MODEL_PRESETS:
                    raise ValueError(f"model.preset: unknown preset {value!r}; available: "
                                     f"{', '.join(MODEL_PRESETS)}")
                self.model.preset = value
            else:
                hints = typing.get_type_hints(ModelConfig)
                self.model.fields[key] = _coerce(f"model.{key}", value, hints[key])
            return
        obj = getattr(self, section)
        hints = typing.get_type_hints(type(obj))
        if key not in hints:
            raise ValueError(f"unknown config key {section}.{key}"
                             f"{_hint(key, list(hints), section + '.')}")
        setattr(obj, key, _coerce(dotted, value, hints[key]))

    def set_text(self, dotted: str, text: str) -> None:
        """Set `section.key` from command-line text: kept verbatim for string keys, else read as
        a TOML value (numbers, booleans, lists)."""
        self.set(dotted, text if self._is_str_key(dotted) else parse_cli_value(text))

    def _is_str_key(self, dotted: str) -> bool:
        section, _, key = dotted.partition(".")
        if section == "model":
            typ = str if key == "preset" else typing.get_type_hints(ModelConfig).get(key)
        elif section in SECTIONS:
            typ = typing.get_type_hints(type(getattr(self, section))).get(key)
        else:
            typ = None
        return typ is str

    def to_toml(self) -> str:
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            for key, value in values.items():
                if value is not None:
                    lines.append(f"{key} = {_toml_value(value)}")
            lines.append("")
        return "\n".join(lines)

    # ------------------------------------------------------------------ checks
    def validate(self) -> ModelConfig:
        """Check every section; returns the model config. Raises ValueError naming the key."""
        model = self.model.build()
        t, d, o = self.train, self.data, self.optim
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "keep_last", "log_every",
                     "eval_batches"):
            if getattr(t, name) <= 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(t, name)}")
        for name in ("save_every", "eval_every", "loss_chunk_size", "max_bad_steps",
                     "sample_tokens"):
            if getattr(t, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(t, name)}")
        if t.seq_len < 2:
            raise ValueError(f"train.seq_len must be at least 2, got {t.seq_len}")
        if t.seq_len > model.max_position_embeddings:
            raise ValueError(f"train.seq_len={t.seq_len} exceeds the model's "
                             f"max_position_embeddings={model.max_position_embeddings}")
        if t.dtype not in ("bfloat16", "float32", "float16"):
            raise ValueError(f"train.dtype must be bfloat16, float16 or float32, got {t.dtype!r}")
        if d.format not in ("auto", "text", "jsonl", "parquet", "arrow"):
            raise ValueError(f"data.format must be auto, text, jsonl, parquet or arrow, "
                             f"got {d.format!r}")
        if not 0.0 <= d.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction must be in [0, 1), got {d.eval_fraction}")
        if d.synthetic_length < 0:
            raise ValueError(f"data.synthetic_length must be >= 0, got {d.synthetic_length}")
        if o.schedule not in ("wsd", "cosine", "linear", "constant"):
            raise ValueError(f"optim.schedule must be wsd, cosine, linear or constant, "
                             f"got {o.schedule!r}")
        if not o.lr > 0:
            raise ValueError(f"optim.lr must be positive, got {o.lr}")
        if not 0.0 <= o.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
        if not 0.0 <= o.decay_fraction <= 1.0:
            raise ValueError(f"optim.decay_fraction must be in [0, 1], got {o.decay_fraction}")
        if o.warmup_steps < 0 or o.grad_clip < 0 or o.weight_decay < 0:
            raise ValueError("optim.warmup_steps, optim.grad_clip and optim.weight_decay must be "
                             ">= 0")
        from .stages import check_run  # train.stages and data.length_mixture

        check_run(self)
        marks = list(o.batch_warmup_tokens)
        if marks != sorted(marks) or any(m <= 0 for m in marks):
            raise ValueError(f"optim.batch_warmup_tokens must be increasing positive token "
                             f"counts, got {marks}")
        if marks and t.grad_accum % (2 ** len(marks)):
            raise ValueError(f"optim.batch_warmup_tokens has {len(marks)} doublings, so "
                             f"train.grad_accum must be a multiple of {2 ** len(marks)} "
                             f"(got {t.grad_accum}): the warm-up halves the micro-batches per step")
        return model


def _hint(key: str, names, prefix: str = "") -> str:
    close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.5)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def _coerce(name: str, value: Any, typ: Any) -> Any:
    """Check `value` against a dataclass annotation, converting the harmless cases
    (int -> float, integral float -> int, scalar -> str for str fields)."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg)
            except ValueError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ValueError(f"{name} must be a list, got {value!r}")
        return [_coerce(name, v, args[0]) if args else v for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a table, got {value!r}")
        return dict(value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, float) and math.isfinite(value) and value == int(value):
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{name} must be a number, got {value!r}")
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{name} must be a string, got {value!r}")
    return value


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"cannot write {value!r} to TOML")


def parse_cli_value(text: str) -> Any:
    """A command-line value as TOML would read it (numbers, booleans, lists), else the string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """`--section.key value` or `--section.key=value` pairs (value text), in order."""
    out = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ValueError(f"unexpected argument {arg!r}: overrides look like "
                             f"--section.key value (sections: {', '.join(SECTIONS)})")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ValueError(f"--{key} needs a value")
            value = args[i + 1]
            i += 1
        out.append((key, value))
        i += 1
    return out


# ---------------------------------------------------------------------- presets
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Seconds on a CPU: what the tests train.
    "debug": {
        "model": {"preset": "debug"},
        "data": {"source": "stdlib"},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "schedule": "constant"},
        "train": {"steps": 8, "batch_size": 2, "seq_len": 64, "dtype": "float32",
                  "out_dir": "runs/debug", "save_every": 4, "log_every": 1, "eval_every": 4,
                  "eval_batches": 1, "sample_tokens": 16},
    },
    # About 3 minutes on a 2-core CPU: loss falls visibly, then a generated sample.
    "demo": {
        "model": {"preset": "demo"},
        "data": {"source": "stdlib"},
        "optim": {"lr": 3e-3, "warmup_steps": 20, "schedule": "wsd", "decay_fraction": 0.3,
                  "min_lr_ratio": 0.1},
        "train": {"steps": 500, "batch_size": 4, "seq_len": 256, "dtype": "float32",
                  "out_dir": "runs/demo", "save_every": 100, "log_every": 20, "eval_every": 100,
                  "eval_batches": 8, "sample_prompt": "def ", "sample_tokens": 300},
    },
    # The `1b` model on one H100 at 8K context: 64 rows of 8K tokens (0.5M tokens) per step, in
    # micro-batches of 64K tokens (about 32 GiB with activation checkpointing).
    "1b-8k": {
        "model": {"preset": "1b"},
        "data": {"source": "stdlib", "tokenizer": "byte"},
        "optim": {"lr": 3e-4, "warmup_steps": 500, "schedule": "wsd", "decay_fraction": 0.2},
        "train": {"steps": 20000, "batch_size": 8, "seq_len": 8192, "grad_accum": 8,
                  "dtype": "bfloat16", "out_dir": "runs/1b-8k", "save_every": 1000,
                  "log_every": 10, "eval_every": 500, "eval_batches": 8,
                  "activation_checkpointing": True, "loss_chunk_size": 8192},
    },
}


def from_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown training preset {name!r}{_hint(name, PRESETS)}; "
                         f"available: {', '.join(PRESETS)}")
    return RunConfig.from_dict(PRESETS[name])


def load_toml(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config file at {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None
    try:
        return RunConfig.from_dict(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def resolve(preset: str | None = None, config_file: str | None = None,
            overrides: list[tuple[str, str]] = ()) -> RunConfig:
    """Preset or TOML file (defaults if neither), then the command-line overrides in order."""
    if preset and config_file:
        raise ValueError("give either --preset or --config, not both")
    cfg = load_toml(config_file) if config_file else from_preset(preset) if preset else RunConfig()
    for key, text in overrides:
        cfg.set_text(key, text)
    return cfg
