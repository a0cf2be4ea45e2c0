"""Run presets: whole training runs by name (`train --preset demo`).

A *run preset* is a model preset (minimax01.config.MODEL_PRESETS, what `info --preset` shows)
plus data, optimizer and loop settings. Where a run preset has the name of a model preset it
trains that model preset (`debug`, `demo`); the others say which one in their name (`1b-8k`:
the `1b` model at 8K context). Values are what a TOML file would hold (config_io.py reads
them)."""

from __future__ import annotations

from typing import Any

RUN_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
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


def model_preset_of(name: str) -> str:
    """The model preset a run preset trains."""
    return RUN_PRESETS[name]["model"]["preset"]
