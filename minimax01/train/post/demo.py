"""Small post-training runs on the synthetic addition task (what tests/test_post_training.py
and benchmarks/post_training_cpu.py / rl_gpu.py train): a format warm-up (SFT on "a+b=<random
number>", so the model answers with a number but not the right one), then GRPO with an
exact-match reward; and DPO on (correct sum, wrong sum) pairs. Each is a staged run
(train.stages), so it resumes like any other."""

from __future__ import annotations

from pathlib import Path

from ..config_io import from_preset, set_value
from .synthetic import write_format_docs, write_preferences

SILENT = {"train.sample_tokens": 0, "train.export": False, "train.tensorboard": False,
          "train.progress": False}


def _config(preset: str, out_dir: Path, overrides: dict):
    cfg = from_preset(preset)
    for key, value in {**SILENT, "train.out_dir": str(out_dir), **overrides}.items():
        set_value(cfg, key, value)
    return cfg


def rl_config(out_dir, *, preset: str = "debug", model: str | None = None, digits: int = 1,
              max_sum: int | None = 4, warmup_steps: int = 60, rl_steps: int = 20,
              rl: dict | None = None, device: str = "cpu", lr: float = 3e-3,
              rl_lr: float = 1e-3, eval_every: int = 5, batch_size: int = 8):
    """A two-stage run: `warmup_steps` of format SFT, then `rl_steps` of GRPO."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = write_format_docs(out_dir / "format.jsonl", 2000, digits=digits, max_sum=max_sum)
    spec = f"addition:{digits}" + (f":{max_sum}" if max_sum is not None else "")
    rl = {"prompts": spec, "group_size": 8, "prompts_per_step": 8, "max_new_tokens": digits + 2,
          "eval_prompts": 32, "kl": "paper", "kl_coef": 0.01, **(rl or {})}
    base = {"data.source": str(docs), "data.eval_fraction": 0.0, "train.device": device,
            "train.dtype": "float32" if device == "cpu" else "bfloat16",
            "train.batch_size": batch_size, "train.seq_len": 32, "train.log_every": 1,
            "optim.lr": lr, "optim.schedule": "constant", "optim.warmup_steps": 5,
            "train.save_every": 0, "train.eval_every": 0}
    if model:
        base["model.preset"] = model
    cfg = _config(preset, out_dir / "run", base)
    cfg.train.stages = [
        {"name": "format", "steps": warmup_steps},
        {"name": "grpo", "steps": rl_steps, "init": "weights",
         "train": {"objective": "grpo", "rl": rl, "eval_every": eval_every},
         "optim": {"lr": rl_lr, "warmup_steps": 0}}]
    return cfg


def dpo_config(out_dir, *, preset: str = "debug", steps: int = 40, pairs: int = 600,
               reference: str = "model", device: str = "cpu", lr: float = 2e-3,
               beta: float = 0.5, eval_every: int = 10):
    """DPO from scratch on (correct sum, wrong sum) pairs of one-digit additions."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = write_preferences(out_dir / "pairs.jsonl", pairs, digits=1)
    return _config(preset, out_dir / "run", {
        "data.source": str(data), "data.eval_fraction": 0.15, "train.device": device,
        "train.dtype": "float32" if device == "cpu" else "bfloat16",
        "train.objective": "dpo", "train.dpo.beta": beta, "train.dpo.reference": reference,
        "train.steps": steps, "train.batch_size": 4, "train.seq_len": 64, "train.log_every": 1,
        "train.eval_every": eval_every, "train.eval_batches": 8, "train.save_every": 0,
        "optim.lr": lr, "optim.schedule": "constant", "optim.warmup_steps": 5})


def rl_curve(run_dir) -> dict:
    """The GRPO stage's per-step numbers of an rl_config run (for printing and plots)."""
    from ..metrics import read_metrics
    from ..stages import stage_runs

    folder = [f for name, f in stage_runs(run_dir) if name == "grpo"][0]
    recs = read_metrics(folder / "metrics.jsonl")
    keys = ("reward", "kl", "clip_frac", "drop_frac", "ratio", "response_length", "kept_groups",
            "time_generate_s", "time_train_s", "loss")
    train = [r for r in recs if "reward" in r]
    return {"step": [r["step"] for r in train], **{k: [r.get(k) for r in train] for k in keys},
            "eval_step": [r["step"] for r in recs if "eval_reward" in r],
            "eval_reward": [r["eval_reward"] for r in recs if "eval_reward" in r]}


def dpo_curve(run_dir) -> dict:
    from ..metrics import read_metrics

    recs = read_metrics(Path(run_dir) / "metrics.jsonl")
    train = [r for r in recs if "margin" in r]
    evals = [r for r in recs if "eval_accuracy" in r]
    return {"step": [r["step"] for r in train], "loss": [r["loss"] for r in train],
            "accuracy": [r["accuracy"] for r in train], "margin": [r["margin"] for r in train],
            "eval_step": [r["step"] for r in evals],
            "eval_accuracy": [r["eval_accuracy"] for r in evals],
            "eval_loss": [r["eval_loss"] for r in evals]}
