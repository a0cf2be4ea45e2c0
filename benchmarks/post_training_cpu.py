"""Post-training curves on CPU, a few minutes: GRPO on the synthetic addition task (after a
format warm-up) and DPO on (correct, wrong) sum pairs, with the debug model.

    python benchmarks/post_training_cpu.py                  # ~3-6 CPU minutes
    python benchmarks/post_training_cpu.py --rl-steps 20 --dpo-steps 20 --out /tmp/pt

Prints the curves, writes post_training_cpu.json (to $OUT if set, else --out) and, when
matplotlib is there (what the `plot` command uses), post_training_cpu.png beside it. Exits 1
if the rollouts' mean reward or the held-out DPO accuracy did not rise."""

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

from minimax01.train.objectives import make_trainer  # noqa: E402
from minimax01.train.post.demo import dpo_config, dpo_curve, rl_config, rl_curve  # noqa: E402
from minimax01.train.stages import run_stages  # noqa: E402


def mean(xs):
    return sum(xs) / max(len(xs), 1)


def plot(rl: dict, dpo: dict, path: Path) -> bool:
    from minimax01.eval.plots import _figure, save_png

    try:
        fig, axes = _figure(1, 2)
    except ValueError:  # no matplotlib
        return False
    axes[0].plot(rl["step"], rl["reward"], label="rollout mean reward")
    axes[0].plot(rl["eval_step"], rl["eval_reward"], marker="o", label="held-out greedy reward")
    axes[0].set_title("GRPO, addition (exact match)")
    axes[1].plot(dpo["step"], dpo["accuracy"], label="train accuracy")
    axes[1].plot(dpo["eval_step"], dpo["eval_accuracy"], marker="o", label="held-out accuracy")
    axes[1].set_title("DPO: chosen > rejected")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    save_png(fig, path)
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rl-steps", type=int, default=60)
    p.add_argument("--warmup-steps", type=int, default=60)
    p.add_argument("--dpo-steps", type=int, default=60)
    p.add_argument("--rl-lr", type=float, default=1e-3)
    p.add_argument("--out", default=None, help="folder for the JSON and the plot")
    p.add_argument("--work", default=None, help="folder for the runs (default: a temp folder)")
    args = p.parse_args()
    torch.set_num_threads(1)  # tiny model: more threads only contend
    out = Path(os.environ.get("OUT") or args.out or ".")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="post_training_cpu_"))

    start = time.perf_counter()
    run_stages(rl_config(work / "rl", warmup_steps=args.warmup_steps, rl_steps=args.rl_steps,
                         rl_lr=args.rl_lr, eval_every=10))
    rl = rl_curve(work / "rl" / "run")
    rl_seconds = time.perf_counter() - start
    start = time.perf_counter()
    make_trainer(dpo_config(work / "dpo", steps=args.dpo_steps, eval_every=10)).fit()
    dpo = dpo_curve(work / "dpo" / "run")
    dpo_seconds = time.perf_counter() - start

    k = max(len(rl["reward"]) // 5, 1)
    summary = {
        "rl_reward_first": mean(rl["reward"][:k]), "rl_reward_last": mean(rl["reward"][-k:]),
        "rl_eval_reward": list(zip(rl["eval_step"], rl["eval_reward"])),
        "rl_time_generate_s": sum(rl["time_generate_s"]),
        "rl_time_train_s": sum(rl["time_train_s"]), "rl_seconds": rl_seconds,
        "dpo_eval_accuracy": list(zip(dpo["eval_step"], dpo["eval_accuracy"])),
        "dpo_seconds": dpo_seconds}
    print("GRPO step  reward  kl      clip   gen_s  train_s")
    for i, s in enumerate(rl["step"]):
        print(f"{s:9d}  {rl['reward'][i]:.3f}   {rl['kl'][i] or 0:.4f}  {rl['clip_frac'][i]:.3f}"
              f"  {rl['time_generate_s'][i]:.2f}   {rl['time_train_s'][i]:.2f}")
    print("held-out greedy reward:", summary["rl_eval_reward"])
    print("DPO held-out accuracy:", summary["dpo_eval_accuracy"])
    print(json.dumps(summary, indent=1))
    (out / "post_training_cpu.json").write_text(json.dumps({"summary": summary, "rl": rl,
                                                            "dpo": dpo}, indent=1))
    if plot(rl, dpo, out / "post_training_cpu.png"):
        print(f"wrote {out / 'post_training_cpu.png'}")
    ok = summary["rl_reward_last"] > summary["rl_reward_first"] and \
        dpo["eval_accuracy"][-1] > dpo["eval_accuracy"][0]
    print("curves rose" if ok else "FAILED: a curve did not rise")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
