"""`python -m minimax01 power plan|compare ...`: how many evaluation samples and training seeds an
experiment needs (plan), and whether two finished runs differ (compare). See docs/evals.md."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cli import CLIError


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    plan = sub.add_parser("plan", help="samples and seeds needed to detect an effect")
    plan.add_argument("--effect", type=float, required=True,
                      help="the difference to detect, in score units (e.g. 0.05 accuracy)")
    plan.add_argument("--baseline", type=float, help="the baseline's mean score (0/1 scores: "
                      "their variance follows from it)")
    plan.add_argument("--sd", type=float, help="per-sample sd of the scores (of per-item "
                      "differences with --paired)")
    plan.add_argument("--pilot", nargs="+", metavar="FILE", help="per-sample scores of a pilot "
                      "run, one file per seed (estimates the mean, sd and seed sd)")
    plan.add_argument("--seed-sd", type=float, default=None,
                      help="sd of a trained model's score across training seeds")
    plan.add_argument("--samples", type=int, nargs="*", default=[],
                      help="also show seeds needed and the detectable effect at these sample counts")
    plan.add_argument("--paired", action="store_true",
                      help="both runs score the same items (the usual case for evals)")
    plan.add_argument("--test", choices=["t", "z"], default="t")
    plan.add_argument("--alpha", type=float, default=0.05)
    plan.add_argument("--power", type=float, default=0.8)
    plan.add_argument("--one-sided", action="store_true")
    plan.add_argument("--json", dest="json_out", help="also write the plan to this JSON file")
    cmp = sub.add_parser("compare", help="is run B different from run A? (paired t + bootstrap)")
    cmp.add_argument("a", help="per-sample scores of run A (eval --json output, JSON, JSONL, text)")
    cmp.add_argument("b", help="per-sample scores of run B, the same items")
    cmp.add_argument("--alpha", type=float, default=0.05)
    cmp.add_argument("--resamples", type=int, default=10_000)
    cmp.add_argument("--seed", type=int, default=0)
    cmp.add_argument("--json", dest="json_out", help="also write the result to this JSON file")


def run(args: argparse.Namespace) -> int:
    if args.action is None:
        raise CLIError("power needs an action: plan or compare (see --help)")
    out = _plan(args) if args.action == "plan" else _compare(args)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2))
    return 0


def _plan(args) -> dict:
    from ..eval import power as pw

    sides = 1 if args.one_sided else 2
    sd, baseline, seed_sd = args.sd, args.baseline, args.seed_sd
    source = "given"
    if args.pilot:
        if sd is not None:
            raise CLIError("give --sd or --pilot, not both")
        est = pw.pilot_estimates([pw.load_scores(f)[1] for f in args.pilot])
        sd, baseline = est["sd"], baseline if baseline is not None else est["mean"]
        if seed_sd is None and est["runs"] > 1:
            seed_sd = est["seed_sd"]
        source = (f"pilot: {est['runs']} run(s) x {est['samples']} samples, mean "
                  f"{est['mean']:.4f}, sd {est['sd']:.4f}"
                  + (f", seed sd {est['seed_sd']:.4f}" if est["runs"] > 1 else ""))
        if args.paired:
            sd = sd * 2 ** 0.5  # differences of two independent runs' per-item scores
    elif sd is None:
        if baseline is None:
            raise CLIError("plan needs --sd, --pilot FILE..., or --baseline for 0/1 scores")
        source = f"0/1 scores at baseline {baseline}"
    if any(n < 1 for n in args.samples):
        raise CLIError("--samples must be positive")
    plan = pw.sample_size(args.effect, sd, baseline, args.alpha, args.power, args.paired,
                          args.test, sides)
    design = "paired" if args.paired else "two independent samples"
    print(f"effect {args.effect:g}, alpha {args.alpha:g} ({sides}-sided), power {args.power:g}, "
          f"{design}, {plan.test}-test; variance from {source}")
    print(f"samples needed: {plan.n} per arm (power {plan.power:.4f}; seed-to-seed variance "
          f"not included: see the seeds table)")
    out = {"effect": args.effect, "alpha": args.alpha, "power": args.power, "sides": sides,
           "paired": args.paired, "test": plan.test, "samples": plan.n,
           "achieved_power": plan.power, "sd": plan.sd, "baseline": baseline, "seed_sd": seed_sd,
           "rows": []}
    # one run's per-sample sd (the seed rows model two arms of independently scored seeds)
    if plan.sd is None:
        per_sample_sd = pw.binary_sd(baseline, args.effect, False)
    else:
        per_sample_sd = plan.sd / 2 ** 0.5 if args.paired else plan.sd
    if seed_sd is not None or args.samples:
        s_sd = seed_sd or 0.0
        print(f"\nwith seed sd {s_sd:g} (each arm = mean over seeds, each seed scored on n samples):")
        print("samples | seeds per arm | detectable effect, 1 seed | with those seeds")
        print("---|---|---|---")
        for n in sorted(set(args.samples or [plan.n, 4 * plan.n, 16 * plan.n])):
            k = pw.seeds_needed(args.effect, n, per_sample_sd, s_sd, args.alpha, args.power, sides)
            m1 = pw.mde(n, per_sample_sd, 1, s_sd, args.alpha, args.power, sides)
            mk = pw.mde(n, per_sample_sd, k, s_sd, args.alpha, args.power, sides)
            print(f"{n} | {k} | {m1:.4g} | {mk:.4g}")
            out["rows"].append({"samples": n, "seeds": k, "mde_1_seed": m1, "mde": mk})
    return out


def _compare(args) -> dict:
    from ..eval import power as pw

    a, b = pw.aligned(pw.load_scores(args.a), pw.load_scores(args.b))
    res = pw.compare(a, b, args.alpha, args.resamples, args.seed)
    verdict = "significant" if res.significant else "not significant"
    print(f"{res.n} paired samples: A {res.mean_a:.4f}, B {res.mean_b:.4f}, B - A {res.diff:+.4f} "
          f"({100 * (1 - res.alpha):.0f}% bootstrap CI [{res.ci[0]:+.4f}, {res.ci[1]:+.4f}])")
    print(f"paired t-test: t = {res.t:.3f}, df = {res.df}, p = {res.p_t:.4g}; paired bootstrap "
          f"({args.resamples} resamples): p = {res.p_bootstrap:.4g} -> {verdict} at alpha "
          f"{res.alpha:g}")
    return res.to_dict()
