"""One online-RL run on one GPU: the `small` preset (104M parameters) learns one-digit addition
with GRPO (the paper's clipping and KL), rollouts from the in-process engine.

    python benchmarks/rl_gpu.py                         # ~3-5 minutes on one H200
    python benchmarks/rl_gpu.py --rl-steps 20 --warmup-steps 60   # shorter

Correctness first: the engine's copy of the weights equals the trainer's after a hand-over
(cast to bf16, in place), and the first minibatch's importance ratio is 1 (the rollout
policy's log-probs were recomputed by the trainer). Then a format warm-up (SFT on "a+b=<random
number>") and GRPO; prints the reward curve (rollout mean, held-out greedy) and the split of
each step's time between generation (engine) and training (log-probs, forward, backward,
AdamW, weight hand-over); writes rl_gpu.json to $OUT (or --out)."""

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

from minimax01 import ModelConfig, MiniMaxForCausalLM  # noqa: E402
from minimax01.train.post.demo import rl_config, rl_curve  # noqa: E402
from minimax01.train.post.rollout import rollout_engine, sync_weights  # noqa: E402
from minimax01.train.stages import run_stages  # noqa: E402


def check_handover(device, model: str) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(model)
    with torch.device(device):
        policy = MiniMaxForCausalLM(cfg).float()
    engine = rollout_engine(policy, cfg, device, None, 64, 4)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01)
    pointers = [p.data_ptr() for p in engine.model.parameters()]
    sync_weights(policy, engine.model)
    for (name, p), q in zip(policy.named_parameters(), engine.model.parameters()):
        assert torch.equal(p.to(q.dtype), q), f"hand-over: {name} differs"
    assert pointers == [p.data_ptr() for p in engine.model.parameters()], "reallocated"
    engine.close()
    print("check: weights handed to the engine in place, equal to the trainer's (bf16)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--warmup-steps", type=int, default=150)
    p.add_argument("--rl-steps", type=int, default=60)
    p.add_argument("--prompts-per-step", type=int, default=32)
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--rl-lr", type=float, default=1e-4)
    p.add_argument("--out", default=None)
    p.add_argument("--model", default="small", help="model preset (debug: a CPU smoke run)")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --device cpu --model debug for a smoke run)")
        return 2
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    out = Path(os.environ.get("OUT") or args.out or ".")
    out.mkdir(parents=True, exist_ok=True)
    check_handover(device, args.model)
    work = Path(tempfile.mkdtemp(prefix="rl_gpu_"))
    cfg = rl_config(work, preset="debug", model=args.model, digits=1, max_sum=None,
                    warmup_steps=args.warmup_steps, rl_steps=args.rl_steps, device=args.device,
                    lr=1e-3, rl_lr=args.rl_lr, eval_every=10, batch_size=64,
                    rl={"prompts_per_step": args.prompts_per_step, "group_size": args.group_size,
                        "max_new_tokens": 3, "eval_prompts": 128})
    start = time.perf_counter()
    run_stages(cfg)
    seconds = time.perf_counter() - start
    rl = rl_curve(work / "run")
    # the first minibatch of every rollout batch: ratio 1 (here every step: minibatches = 1)
    ratios = [x for x in rl["ratio"] if x is not None]
    worst = max(abs(x - 1) for x in ratios)
    print(f"check: mean importance ratio at each update (one minibatch per rollout batch, so "
          f"1 up to rounding): max |ratio - 1| = {worst:.2e}")
    gen, train = sum(rl["time_generate_s"]), sum(rl["time_train_s"])
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}; {args.prompts_per_step} "
          f"prompts x {args.group_size} rollouts per step")
    print("step  reward  kl       clip   drop   len   gen_s  train_s")
    for i, s in enumerate(rl["step"]):
        print(f"{s:4d}  {rl['reward'][i]:.3f}   {rl['kl'][i] or 0:.5f}  {rl['clip_frac'][i]:.3f}  "
              f"{rl['drop_frac'][i]:.3f}  {rl['response_length'][i]:.2f}  "
              f"{rl['time_generate_s'][i]:.3f}  {rl['time_train_s'][i]:.3f}")
    print("held-out greedy reward:", list(zip(rl["eval_step"], rl["eval_reward"])))
    print(f"RL time: generation {gen:.1f} s ({100 * gen / (gen + train):.0f}%), training "
          f"{train:.1f} s ({100 * train / (gen + train):.0f}%); whole run {seconds:.1f} s")
    record = {"device": name, "torch": torch.__version__,
              "args": vars(args), "seconds": seconds, "generate_s": gen, "train_s": train,
              "max_ratio_error": worst, "curve": rl}
    (out / "rl_gpu.json").write_text(json.dumps(record, indent=1))
    ok = worst < 1e-2
    print("ok" if ok else "FAILED: the rollout log-probs do not match the trainer's")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
