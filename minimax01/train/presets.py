"""Run presets: whole training runs by name (`train --preset demo`).

A *run preset* is a model preset (minimax01.config.MODEL_PRESETS, what `info --preset` shows)
plus data, optimizer and loop settings. Where a run preset has the name of a model preset it
trains that model preset (`debug`, `demo`); the others say which one in their name (`1b-8k`:
the `1b` model at 8K context). Values are what a TOML file would hold (config_io.py reads
them).

A *stage preset* (STAGE_PRESETS) is a list of stages for `train.stages` (train/stages.py): the
papers' context-extension schedules and MiniMax-01's post-training table."""

from __future__ import annotations

import math
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
    # A few minutes on a 2-core CPU: the tiny VL model (vl-debug) trained on questions about
    # synthetic images (colour, shape, count, position, character); held-out accuracy per task
    # is printed before and after (train/vl_train.py). Measured: it learns the answer format
    # (0% -> 19%) but stays at chance per task: it does not read the images yet (docs/vision.md).
    "vl-demo": {
        "model": {"preset": "vl-debug"},
        "data": {"source": "synthetic_images"},
        "optim": {"lr": 4e-3, "warmup_steps": 10, "schedule": "wsd", "decay_fraction": 0.3,
                  "min_lr_ratio": 0.1, "weight_decay": 0.0},
        "train": {"steps": 300, "batch_size": 1, "seq_len": 1024, "dtype": "float32",
                  "out_dir": "runs/vl-demo", "log_every": 20, "eval_batches": 100,
                  "freeze": "stage2", "export": False},
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

# Document-length buckets of the papers' mixtures, in tokens.
_K = 1024
_SHORT, _MEDIUM, _LONG = [0, 32 * _K], [32 * _K, 128 * _K], [128 * _K, math.inf]

# Stage presets: the papers' context-extension schedules, a `train.stages` value by name
# (`train.stages = "minimax-01"`; train/stages.py runs them).
STAGE_PRESETS: dict[str, list[dict[str, Any]]] = {
    # MiniMax-01 (arXiv 2501.08313), the long-context extension table (§4.2; Table 6 per issue
    # 17): after 8K pre-training, three stages. Numbers as read from a secondary copy of the
    # table (not checked against the PDF here): see docs/training.md.
    "minimax-01": [
        {"name": "128k", "seq_len": 128 * _K, "rope_theta": 5e6, "tokens": 300e9,
         "length_mixture": [_SHORT + [0.30], _MEDIUM + [0.70], _LONG + [0.0]]},
        {"name": "512k", "seq_len": 512 * _K, "rope_theta": 1e7, "tokens": 32e9,
         "length_mixture": [_SHORT + [0.35], _MEDIUM + [0.35], _LONG + [0.30]]},
        {"name": "1m", "seq_len": 1024 * _K, "rope_theta": 1e7, "tokens": 26e9,
         "length_mixture": [_SHORT + [0.30], _MEDIUM + [0.30], _LONG + [0.40]]},
    ],
    # MiniMax-01 post-training (arXiv 2501.08313 §5, Table 7), after the long-context
    # extension: SFT at 8K; SFT at 1,032,192 tokens with half the prompts long (here: half the
    # rows from documents over 32K tokens); DPO at 8K, then at 1,032,192; online RL (GRPO) at 8K.
    # Lengths, epochs, batch sizes and LR ranges as we read the table (not checked against the
    # PDF here; docs/post_training.md). The paper counts epochs of its own data: set `steps` or
    # `tokens` per stage for yours (check_run says so), and each stage's data (chat data for
    # SFT, preference pairs for DPO, train.rl.prompts for RL). A new objective starts a fresh
    # AdamW ("init": "weights"). The RL batch of 512 is rollouts: prompts_per_step x group_size.
    "minimax-01-post": [
        {"name": "sft-8k", "seq_len": 8192, "batch_size": 128, "epochs": 2,
         "optim": {"lr": 1e-5, "min_lr_ratio": 0.1, "schedule": "cosine"}},
        {"name": "sft-1m", "seq_len": 1032192, "batch_size": 80, "epochs": 2,
         "length_mixture": [_SHORT + [0.5], [32 * _K, math.inf, 0.5]],
         "optim": {"lr": 3e-6, "min_lr_ratio": 1.0, "schedule": "constant"}},
        {"name": "dpo-8k", "seq_len": 8192, "batch_size": 64, "epochs": 1, "init": "weights",
         "train": {"objective": "dpo"},
         "optim": {"lr": 5e-7, "min_lr_ratio": 0.1, "schedule": "cosine"}},
        {"name": "dpo-1m", "seq_len": 1032192, "batch_size": 64, "epochs": 1,
         "train": {"objective": "dpo"},
         "optim": {"lr": 5e-7, "min_lr_ratio": 1.0, "schedule": "constant"}},
        {"name": "rl-8k", "seq_len": 8192, "batch_size": 512, "epochs": 1, "init": "weights",
         "train": {"objective": "grpo"},
         "optim": {"lr": 1e-6, "min_lr_ratio": 0.1, "schedule": "cosine"}},
    ],
    # MiniMax-M1 (arXiv 2506.13585) §2: continual pre-training extends the context "in four
    # stages" from 32K to 1M. The intermediate lengths below, the RoPE base (Text-01's 10M) and
    # the absence of budgets are our assumptions: the paper gives no per-stage table we could
    # verify. Set `tokens` before use.
    "minimax-m1": [
        {"name": "32k", "seq_len": 32 * _K, "rope_theta": 1e7},
        {"name": "128k", "seq_len": 128 * _K, "rope_theta": 1e7},
        {"name": "512k", "seq_len": 512 * _K, "rope_theta": 1e7},
        {"name": "1m", "seq_len": 1024 * _K, "rope_theta": 1e7},
    ],
}


def model_preset_of(name: str) -> str:
    """The model preset a run preset trains."""
    return RUN_PRESETS[name]["model"]["preset"]
