"""Forward tokens/s by sequence length for several exported models, measured interleaved (every
round visits every model at every length, the best of the rounds is kept) so that a busy or
thermally drifting machine treats the models alike. The ablation's own per-run measurement
(`ablate --phase eval`) runs the models one after another; use this when comparing on a shared
machine.

    python benchmarks/forward_throughput.py runs/ablate-tiny/runs/*/model --lengths 256,1024,4096
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from minimax01 import MiniMaxForCausalLM


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+", help="HF-format model folders")
    p.add_argument("--lengths", default="1024,4096,16384")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    dev = torch.device(args.device)
    models = {Path(m).parent.name if Path(m).name == "model" else Path(m).name:
              MiniMaxForCausalLM.from_pretrained(m, device=dev).eval() for m in args.models}
    best = {(name, n): float("inf") for name in models for n in lengths}
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for r in range(args.rounds + 1):  # round 0 warms up
            for n in lengths:
                x = torch.randint(0, 256, (1, n), generator=gen).to(dev)
                for name, model in models.items():
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    t0 = time.perf_counter()
                    model(x, logits_to_keep=1)
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    if r:
                        best[(name, n)] = min(best[(name, n)], time.perf_counter() - t0)
    print(f"forward tokens/s (batch 1, best of {args.rounds} interleaved rounds, {dev})")
    print("model | " + " | ".join(str(n) for n in lengths) + " | last / first")
    print("|".join(["---"] * (len(lengths) + 2)))
    for name in models:
        tps = [n / best[(name, n)] for n in lengths]
        print(f"{name} | " + " | ".join(f"{t:.0f}" for t in tps) + f" | {tps[-1] / tps[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
