"""`python -m minimax01 ablate SUITE_DIR --out OUT [--phase ...] [--only NAME ...]`: train every
run of an ablation suite (configs/ablations/) on one shared corpus at matched parameters and
compute, evaluate them, and write OUT/ablation.md, OUT/ablation.json and the figures. Re-running
resumes; SIGTERM saves the current run's checkpoint and stops (exit 143). See docs/evals.md."""

from __future__ import annotations

import sys
from pathlib import Path

from ..cli import CLIError

PHASES = ("data", "train", "eval", "report")


def add_arguments(p) -> None:
    p.add_argument("suite", help="a suite folder: suite.toml and one training TOML per run")
    p.add_argument("--out", default="runs/ablate", help="everything the suite writes")
    p.add_argument("--phase", choices=PHASES + ("all",), default="all",
                   help="data: write the corpus; train; eval; report (tables, figures)")
    p.add_argument("--only", nargs="+", metavar="RUN", help="train / evaluate only these runs")
    p.add_argument("--flops", type=float, help="override the suite's budget: training FLOPs per run")
    p.add_argument("--tokens", type=float, help="override the suite's budget: tokens per run")
    p.add_argument("--dry-run", action="store_true",
                   help="print the parameter / FLOP arithmetic and exit")
    p.add_argument("--device", default=None, help="evaluation device (default: cuda if present)")
    p.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")


def _print_arithmetic(suite) -> None:
    from ..eval.ablation import arithmetic
    from ..eval.ablation_report import _count

    budget = (f"{_count(suite.flops)} training FLOPs per run" if suite.budget == "flops"
              else f"{_count(suite.tokens)} tokens per run")
    print(f"suite {suite.folder}: budget {budget}; parameters matched to {suite.reference} "
          f"(tolerance {100 * suite.param_tolerance:g}%)")
    print("run | layers | params | vs ref | active | train FLOPs/token @ seq_len | steps | tokens "
          "| train FLOPs")
    print("---|---|---|---|---|---|---|---|---")
    for a in arithmetic(suite):
        print(f"{a['run']} | {a['layers']} | {a['params']:,} | {100 * a['params_vs_reference']:+.2f}% "
              f"| {a['active_params']:,} | {_count(a['train_flops_per_token'])} | {a['steps']} | "
              f"{_count(a['tokens'])} | {_count(a['train_flops'])}")


def run(args) -> int:
    from ..eval import ablation, ablation_report

    suite = ablation.load_suite(args.suite)
    if args.flops is not None and args.tokens is not None:
        raise CLIError("give --flops or --tokens, not both")
    if args.flops is not None or args.tokens is not None:
        value = args.flops if args.flops is not None else args.tokens
        if not value > 0:
            raise CLIError("the budget must be positive")
        suite.budget = "flops" if args.flops is not None else "tokens"
        suite.flops, suite.tokens = (value, 0.0) if args.flops is not None else (0.0, value)
    ablation.check_matched(suite)
    names = list(suite.runs)
    if args.only:
        bad = [n for n in args.only if n not in suite.runs]
        if bad:
            raise CLIError(f"--only: no run {bad[0]!r} in the suite ({', '.join(names)})")
        names = list(args.only)
    _print_arithmetic(suite)
    if args.dry_run:
        return 0
    out = Path(args.out)
    if not args.no_plots and args.phase in ("all", "report"):
        from ..eval.plots import _figure

        _figure(1, 1)  # matplotlib missing: fail before hours of training
    phases = PHASES if args.phase == "all" else (args.phase,)
    if "data" in phases or "train" in phases:
        meta = ablation.write_corpus(suite.data, out / "data")
        print(f"corpus: {meta['documents']} documents {meta['counts']}, "
              f"{meta['heldout_characters']} held-out characters")
    if "train" in phases:
        for name in names:
            stopped = ablation.train_run(suite, name, out)
            if stopped:
                print(f"stopped by signal {stopped} during {name}; re-run the same command to "
                      f"resume", file=sys.stderr)
                return 128 + int(stopped)
    if "eval" in phases:
        for name in names:
            ablation.evaluate_run(suite, name, out, args.device)
    if "report" in phases:
        import json

        missing = [n for n in suite.runs if not (out / "evals" / f"{n}.json").is_file()]
        if missing:
            raise CLIError(f"report: runs not evaluated yet: {', '.join(missing)} (phase eval)")
        results = {n: json.loads((out / "evals" / f"{n}.json").read_text()) for n in suite.runs}
        report = ablation_report.write(suite, out, results, plots=not args.no_plots)
        print(ablation_report.markdown(report))
        print(f"wrote {out / 'ablation.md'}, {out / 'ablation.json'}"
              + (f" and {len(report.get('figures', []))} figures" if not args.no_plots else ""))
    return 0
