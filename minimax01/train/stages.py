"""Training in stages (`train.stages`): context extension as in MiniMax-01 / MiniMax-M1 (each
stage its own sequence length, RoPE base, data mixture by document length, batch size and token
budget), and any other sequence of runs that continue one another (SFT / DPO / RL stages may
override any [train], [optim] or [data] key).

A stage is a table. Short keys: `name`, `seq_len`, `rope_theta`, `batch_size`, `length_mixture`
([[lo, hi, weight], ...] in tokens), `tokens` (the budget; steps = ceil(tokens / tokens per
step)) or `steps`; `init` = "continue" (weights and AdamW state of the previous stage, the
default) or "weights" (weights only, a fresh optimizer); `init_from` = a training checkpoint
folder or an HF model folder to start from (default: the previous stage's final checkpoint;
none for the first stage); `epochs` records a paper's count (informative: the budget is
`tokens` or `steps`). Tables `train`, `optim`, `data` override any key of those sections,
`model` the keys that keep the weights' shapes (`STAGE_MODEL_KEYS`).

Each stage is an ordinary run in `out_dir/stages/NN-name/` (its own checkpoints, metrics.jsonl,
export): a kill mid-stage resumes from that stage's newest checkpoint; a finished stage writes
`stage_done.json` (its config and final checkpoint) and is skipped on a re-run; the next stage
always starts from the finished stage's checkpoint on disk, so a run interrupted at a boundary
continues exactly like an uninterrupted one. A stage's `train.seed` is the base seed + its index
(data order) unless it sets its own. `train.stages = "minimax-01"` (or another STAGE_PRESETS
name) takes a preset: the papers' own schedules, for reference (`python -m minimax01.train.stages
PRESET --length-scale 1/32 --token-scale 1e-6` prints a scaled-down copy as TOML)."""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

from .config import RunConfig
from .config_io import _toml_value, from_dict, set_value, to_toml
from .presets import STAGE_PRESETS

STAGE_KEYS = ("name", "seq_len", "rope_theta", "batch_size", "length_mixture", "tokens", "steps",
              "epochs", "init", "init_from", "train", "optim", "data", "model")
STAGE_MODEL_KEYS = ("rope_theta", "max_position_embeddings", "router_aux_loss_coef",
                    "capacity_factor", "dtype", "sliding_window")
DONE_FILE = "stage_done.json"


def _hint(key: str, names) -> str:
    close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def resolve_stages(spec) -> list[dict[str, Any]]:
    """The list of stage tables (a preset name expanded)."""
    if isinstance(spec, str):
        if not spec:
            return []
        if spec not in STAGE_PRESETS:
            raise ValueError(f"train.stages: unknown preset {spec!r}{_hint(spec, STAGE_PRESETS)}; "
                             f"available: {', '.join(STAGE_PRESETS)}")
        return [dict(s) for s in STAGE_PRESETS[spec]]
    return [dict(s) for s in spec]


def stage_name(stage: dict, index: int) -> str:
    name = str(stage.get("name") or f"stage{index}")
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"train.stages[{index}].name must be letters, digits, - or _, got {name!r}")
    return name


def stage_dir(out_dir: str | Path, index: int, name: str) -> Path:
    return Path(out_dir) / "stages" / f"{index:02d}-{name}"


def stage_config(base: RunConfig, stages: list[dict], index: int) -> RunConfig:
    """The RunConfig of stage `index`: the base config with the stage's overrides (each key
    and value checked as a TOML file's would be, config_io.py)."""
    st = stages[index]
    where = f"train.stages[{index}]"
    if not isinstance(st, dict):
        raise ValueError(f"{where} must be a table, got {st!r}")
    unknown = [k for k in st if k not in STAGE_KEYS]
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}{_hint(unknown[0], STAGE_KEYS)}")
    name = stage_name(st, index)
    cfg = from_dict(base.to_dict())
    cfg.train.stages = []
    cfg.train.seed = base.train.seed + index

    def put(dotted: str, value) -> None:
        try:
            set_value(cfg, dotted, value)
        except ValueError as e:
            raise ValueError(f"{where} ({name}): {e}") from None

    for key, dotted in (("seq_len", "train.seq_len"), ("batch_size", "train.batch_size"),
                        ("rope_theta", "model.rope_theta"),
                        ("length_mixture", "data.length_mixture")):
        if key in st:
            put(dotted, st[key])
    for section in ("train", "optim", "data", "model"):
        table = st.get(section, {})
        if not isinstance(table, dict):
            raise ValueError(f"{where}.{section} must be a table, got {table!r}")
        for key, value in table.items():
            if section == "model" and key not in STAGE_MODEL_KEYS:
                raise ValueError(f"{where}.model.{key}: a stage cannot change the model's shapes "
                                 f"(stage model keys: {', '.join(STAGE_MODEL_KEYS)})")
            if section == "train" and key in ("stages", "out_dir"):
                raise ValueError(f"{where}.train.{key} cannot be set per stage")
            put(f"{section}.{key}", value)
    cfg.train.out_dir = str(stage_dir(base.train.out_dir, index, name))
    if ("tokens" in st) == ("steps" in st):
        epochs = "" if "epochs" not in st else \
            f" (the preset's schedule says {st['epochs']} epoch(s) of its own data; set the " \
            f"steps or tokens that are that many epochs of yours)"
        raise ValueError(f"{where} ({name}): give exactly one of tokens (the budget) or "
                         f"steps{epochs}")
    if "steps" in st:
        put("train.steps", st["steps"])
    else:
        per_step = cfg.train.batch_size * cfg.train.seq_len * cfg.train.grad_accum
        tokens = st["tokens"]
        if isinstance(tokens, bool) or not isinstance(tokens, (int, float)) \
                or not math.isfinite(tokens) or not tokens > 0:
            raise ValueError(f"{where} ({name}): tokens must be a positive finite number, "
                             f"got {tokens!r}")
        cfg.train.steps = max(1, math.ceil(tokens / per_step - 1e-9))
    if st.get("init", "continue") not in ("continue", "weights"):
        raise ValueError(f"{where}.init must be 'continue' or 'weights', got {st['init']!r}")
    if st.get("init_from") is not None and not isinstance(st["init_from"], str):
        raise ValueError(f"{where}.init_from must be a path")
    return cfg


def check_run(cfg: RunConfig):
    """RunConfig.validate, and every stage's own config (its overrides applied); returns the
    base model config. What the train command checks before anything runs or is printed."""
    model = cfg.validate()
    stages = resolve_stages(cfg.train.stages)
    names = []
    for i in range(len(stages)):
        sub = stage_config(cfg, stages, i)
        names.append(Path(sub.train.out_dir).name)
        try:
            sub.validate()
        except ValueError as e:
            raise ValueError(f"train.stages[{i}] ({stage_name(stages[i], i)}): {e}") from None
    if len(set(names)) != len(names):
        raise ValueError("train.stages: two stages have the same name")
    return model


# ---------------------------------------------------------------------- running
def _initializer(path: Path, with_optimizer: bool, optim_cfg):
    """Trainer `init` hook: fill the freshly built model (and AdamW, unless None: a reference
    model) from `path`, a training
    checkpoint (its manifest and checksums verified: parallel/checkpoint.py) or an HF model
    folder; the stage's own AdamW settings are re-applied
    (a loaded optimizer state carries the previous stage's)."""

    def init(model, optimizer) -> None:
        from ..parallel import checkpoint as training_checkpoint
        from .checkpointing import STATE_FILE

        if (path / STATE_FILE).is_file():
            training_checkpoint.load(path, model, optimizer if with_optimizer else None)
        elif (path / "config.json").is_file():
            from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                                 set_model_state_dict)

            from ..model import MiniMaxForCausalLM

            source = MiniMaxForCausalLM.from_pretrained(path, device="cpu")
            state = {k: v.float() for k, v in source.state_dict().items()}
            set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        else:
            raise FileNotFoundError(f"init_from {path}: neither a training checkpoint "
                                    f"(trainer_state.json) nor an HF model (config.json)")
        for i, group in enumerate(optimizer.param_groups if optimizer is not None else []):
            group["betas"] = (optim_cfg.beta1, optim_cfg.beta2)
            group["eps"] = optim_cfg.eps
            group["weight_decay"] = optim_cfg.weight_decay if i == 0 else 0.0

    return init


def plan(cfg) -> list[dict]:
    """What each stage is: name, folder, seq_len, RoPE base, steps, tokens (for stages.json)."""
    stages = resolve_stages(cfg.train.stages)
    out = []
    for i in range(len(stages)):
        sub = stage_config(cfg, stages, i)
        t = sub.train
        out.append({"index": i, "name": stage_name(stages[i], i), "out_dir": t.out_dir,
                    "seq_len": t.seq_len, "rope_theta": sub.model.build().rope_theta,
                    "batch_size": t.batch_size, "steps": t.steps,
                    "tokens": t.steps * t.batch_size * t.seq_len * t.grad_accum,
                    "length_mixture": [[lo, "inf" if math.isinf(hi) else hi, w]
                                       for lo, hi, w in sub.data.length_mixture]})
    return out


def run_stages(cfg, world=None) -> list:
    """Run (or resume) every stage in order; returns their TrainResults. Stops after a stage
    that was stopped by a signal (its result is the last one)."""
    from .objectives import make_trainer
    from .trainer import make_world

    stages = resolve_stages(cfg.train.stages)
    if not stages:
        raise ValueError("run_stages needs train.stages")
    check_run(cfg)
    world = world if world is not None else make_world(cfg)
    root = Path(cfg.train.out_dir)
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        (root / "config.toml").write_text(to_toml(cfg))
        (root / "stages.json").write_text(json.dumps(plan(cfg), indent=1))
    world.barrier()
    results, previous = [], None
    for i, st in enumerate(stages):
        sub = stage_config(cfg, stages, i)
        folder = Path(sub.train.out_dir)
        identity = _identity(sub)
        done = folder / DONE_FILE
        if done.is_file():
            record = json.loads(done.read_text())
            diffs = _differences(record["config"], identity)
            if diffs:
                raise ValueError(f"stage {i} ({folder.name}) already finished with another "
                                 f"config ({'; '.join(diffs[:3])}); use another train.out_dir "
                                 f"or restore the stage's settings")
            previous = Path(record["checkpoint"])
            results.append(_done_result(record))
            continue
        source = st.get("init_from")
        source = Path(source) if source else previous
        init = None
        if source is not None:
            init = _initializer(source, st.get("init", "continue") == "continue", sub.optim)
        trainer = make_trainer(sub, world, init=init)
        result = trainer.fit()
        results.append(result)
        if result.stopped_by_signal:
            return results
        if world.is_main:
            record = {"config": identity, "checkpoint": str(result.checkpoint),
                      "step": result.step, "tokens": result.tokens, "eval_loss": result.eval_loss,
                      "export": str(result.export) if result.export else None}
            tmp = done.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=1))
            tmp.replace(done)
        world.barrier()
        previous = result.checkpoint
    return results


# keys that do not change what a finished stage computed
_COSMETIC = {"out_dir", "progress", "tensorboard", "log_every", "save_every", "keep_last",
             "eval_every", "eval_batches", "export", "sample_prompt", "sample_tokens",
             "max_bad_steps", "device", "compile"}


def _identity(cfg) -> dict:
    data = cfg.to_dict()
    data["train"] = {k: v for k, v in data["train"].items() if k not in _COSMETIC}
    data.pop("parallel", None)
    return data


def _differences(saved: dict, now: dict) -> list[str]:
    out = []
    for section in sorted(set(saved) | set(now)):
        a, b = saved.get(section, {}), now.get(section, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                out.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return out


def _done_result(record: dict):
    from .trainer import TrainResult

    return TrainResult(step=record["step"], tokens=record["tokens"],
                       eval_loss=record.get("eval_loss"), checkpoint=Path(record["checkpoint"]),
                       export=Path(record["export"]) if record.get("export") else None)


def stage_runs(out_dir: str | Path) -> list[tuple[str, Path]]:
    """(name, folder) of the stages a staged run has started, in order (for plots)."""
    root = Path(out_dir) / "stages"
    if not root.is_dir():
        return []
    found = [p for p in sorted(root.iterdir()) if p.is_dir() and p.name[:2].isdigit()]
    return [(p.name.split("-", 1)[-1], p) for p in found]


# ---------------------------------------------------------------------- scaled presets
def scaled(name: str, length_scale: float = 1.0, token_scale: float = 1.0) -> list[dict]:
    """A preset with sequence lengths and mixture edges times `length_scale` and budgets times
    `token_scale` (a small-scale replica of a paper's schedule)."""
    out = []
    for st in copy.deepcopy(resolve_stages(name)):
        st["seq_len"] = max(2, int(round(st["seq_len"] * length_scale)))
        if "length_mixture" in st:
            st["length_mixture"] = [[lo * length_scale, hi * length_scale, w]
                                    for lo, hi, w in st["length_mixture"]]
        if "tokens" in st:
            st["tokens"] = float(st["tokens"]) * token_scale
        out.append(st)
    return out


def main(argv=None) -> int:
    """`python -m minimax01.train.stages PRESET [--length-scale X] [--token-scale Y]`: a preset's
    stages as TOML (`[[train.stages]]` tables) to paste into a config."""

    p = argparse.ArgumentParser(prog="python -m minimax01.train.stages",
                                description=main.__doc__.split("\n")[0].strip(" `"))
    p.add_argument("preset", choices=list(STAGE_PRESETS))
    p.add_argument("--length-scale", default="1", help="e.g. 1/32 (128K -> 4K)")
    p.add_argument("--token-scale", default="1", help="e.g. 1e-6")
    args = p.parse_args(argv)
    try:
        ls, ts = float(Fraction(args.length_scale)), float(Fraction(args.token_scale))
    except (ValueError, ZeroDivisionError):
        p.error("--length-scale and --token-scale must be numbers or fractions")
    for st in scaled(args.preset, ls, ts):
        print("[[train.stages]]")
        for key, value in st.items():
            print(f"{key} = {_toml_value(value)}")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
