"""Peak GPU memory of one full fine-tuning step and one LoRA step vs train/memory.py's prediction.

    python benchmarks/finetune_memory.py [--preset 1b] [--seq-len 8192] [--lora-rank 16]

Uses the trainer's own pieces (Trainer.build_model, its forward, build_optimizer), one process,
bf16 autocast, activation checkpointing and the chunked loss, synthetic data. Correctness first:
the LoRA model at initialisation gives the base model's loss, and every step's loss is finite.
Both modes start from the same seeded weights, so their first losses agree.
Then for each mode: two optimizer steps (AdamW allocates its moments in the first), the peak of
torch.cuda.max_memory_allocated, and the prediction (less its fixed overhead allowance, which
max_memory_allocated does not see). Prints a table; writes $OUT/finetune_memory.json if $OUT is
set. About a minute on one H200 (runs on CPU with --preset debug --seq-len 256 for a smoke test)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minimax01.train.config_io import parse_overrides, resolve  # noqa: E402
from minimax01.train.memory import GiB, plan_training  # noqa: E402
from minimax01.train.optim import build_optimizer  # noqa: E402
from minimax01.train.trainer import Trainer  # noqa: E402

TARGETS = ["qkv_proj", "output_gate", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj"]


def trainer_for(args, out_dir: str, lora_rank: int) -> Trainer:
    over = ["--model.preset", args.preset, "--data.source", "synthetic",
            "--data.eval_fraction", "0", "--train.seq_len", str(args.seq_len),
            "--train.batch_size", "1", "--train.activation_checkpointing", "true",
            "--train.loss_chunk_size", str(args.loss_chunk), "--train.out_dir", out_dir,
            "--train.tensorboard", "false", "--train.sample_tokens", "0",
            "--train.lora.rank", str(lora_rank), "--train.dtype", args.dtype]
    return Trainer(resolve(None, None, parse_overrides(over)))


def one_mode(args, lora_rank: int) -> dict:
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as out:
        trainer = trainer_for(args, out, lora_rank)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated() if cuda else 0
        model = trainer.build_model()
        model.train()
        optimizer = build_optimizer(model, trainer.cfg.optim)
        weights = (torch.cuda.memory_allocated() - start) if cuda else 0
        batch = trainer._batch_to_device(trainer.data.next_batch())
        losses = []
        t0 = time.perf_counter()
        for _ in range(2):
            _, lm_sum, n = trainer._forward(model, batch)
            loss = lm_sum / n
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated() - start) if cuda else 0
        assert all(torch.isfinite(torch.tensor(losses))), losses
        del model, optimizer, batch
        cfg = trainer.model_cfg
    plan = plan_training(cfg, 1, lora_rank=lora_rank, lora_targets=TARGETS, tokens=args.seq_len,
                         recompute="full", loss_chunk=args.loss_chunk, overhead=0)
    return {"mode": "lora" if lora_rank else "full", "losses": losses, "seconds_2_steps": elapsed,
            "measured_weights_bytes": weights, "measured_peak_bytes": peak,
            "predicted_bytes": plan.total, "predicted_parts": plan.parts,
            "ratio_measured_over_predicted": peak / plan.total if peak else None}


def check_lora_identity(args) -> float:
    """A freshly adapted model (B = 0) gives the base model's loss on the same batch."""
    with tempfile.TemporaryDirectory() as out:
        base_t = trainer_for(args, out, 0)
    torch.manual_seed(0)
    base = base_t.build_model().to(base_t.world.device)
    batch = base_t._batch_to_device(base_t.data.next_batch())
    with torch.no_grad():
        ref = float(base_t._forward(base, batch)[1])
        from minimax01.train.lora import apply_lora

        apply_lora(base, args.lora_rank, 2.0 * args.lora_rank, TARGETS)
        got = float(base_t._forward(base, batch)[1])
    del base
    assert abs(got - ref) <= 1e-6 * max(1.0, abs(ref)), (got, ref)
    return abs(got - ref)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="1b")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--loss-chunk", type=int, default=4096)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}; "
          f"torch {torch.__version__}; preset {args.preset}, {args.seq_len} tokens, "
          f"loss chunk {args.loss_chunk}, LoRA rank {args.lora_rank}")
    diff = check_lora_identity(args)
    print(f"check: LoRA at init == base loss (|diff| {diff:.2e})")
    full = one_mode(args, 0)
    lora = one_mode(args, args.lora_rank)
    # the same seeded base weights: the first step's loss is the same (bf16 frozen matrices are
    # what autocast multiplies with anyway)
    first = (full["losses"][0], lora["losses"][0])
    assert abs(first[0] - first[1]) <= 2e-3 * abs(first[0]), first
    print(f"check: first-step loss full {first[0]:.5f} == LoRA {first[1]:.5f}")
    print(f"\n{'mode':6} {'weights GiB':>12} {'peak GiB':>10} {'predicted GiB':>14} {'ratio':>7} "
          f"{'2 steps s':>10}  losses")
    for r in (full, lora):
        ratio = r["ratio_measured_over_predicted"]
        print(f"{r['mode']:6} {r['measured_weights_bytes'] / GiB:12.2f} "
              f"{r['measured_peak_bytes'] / GiB:10.2f} {r['predicted_bytes'] / GiB:14.2f} "
              f"{(ratio if ratio else float('nan')):7.3f} {r['seconds_2_steps']:10.2f}  "
              f"{', '.join(f'{x:.4f}' for x in r['losses'])}")
        print("       predicted: " + ", ".join(f"{k} {v / GiB:.2f}"
                                              for k, v in r["predicted_parts"].items()))
    out = os.environ.get("OUT")
    if out:
        Path(out, "finetune_memory.json").write_text(json.dumps(
            {"args": vars(args), "torch": torch.__version__,
             "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
             "results": [full, lora]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
