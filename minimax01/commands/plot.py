"""`python -m minimax01 plot RUN_DIR [--out FILE.png]`: a run's training curves (loss and
held-out loss, tokens/s, MoE load, learning rate) from its metrics.jsonl; a staged run
(train.stages) is drawn end to end with its stage boundaries. Needs matplotlib."""

from __future__ import annotations

from pathlib import Path

from ..cli import CLIError


def add_arguments(p) -> None:
    p.add_argument("run_dir", help="a training run's out_dir (holds metrics.jsonl, or stages/)")
    p.add_argument("--out", metavar="FILE.png", help="default: RUN_DIR/plots/training.png")


def load_run(run_dir: str | Path) -> tuple[list[dict], list[tuple[int, str]]]:
    """The run's records with steps made global over stages, and [(first step, stage name)]."""
    from ..train.metrics import read_metrics
    from ..train.stages import stage_runs

    run_dir = Path(run_dir)
    stages = stage_runs(run_dir)
    if not stages:
        path = run_dir / "metrics.jsonl"
        if not path.is_file():
            raise CLIError(f"{run_dir}: no metrics.jsonl (is it a training run's out_dir?)")
        return read_metrics(path), []
    records, boundaries, offset = [], [], 0
    for name, folder in stages:
        path = folder / "metrics.jsonl"
        if not path.is_file():
            continue
        rows = read_metrics(path)
        if offset:
            boundaries.append((offset, name))
        for r in rows:
            records.append({**r, "step": r.get("step", 0) + offset, "stage": name})
        offset += max((r.get("step", 0) for r in rows), default=0)
    return records, boundaries


def run(args) -> int:
    from ..eval.plots import run_figure, save_png

    records, boundaries = load_run(args.run_dir)
    if not any("loss" in r or "eval_loss" in r for r in records):
        raise CLIError(f"{args.run_dir}: metrics.jsonl has no loss records yet")
    out = Path(args.out) if args.out else Path(args.run_dir) / "plots" / "training.png"
    fig = run_figure(records, title=str(Path(args.run_dir).name), boundaries=boundaries)
    save_png(fig, out)
    print(f"wrote {out}")
    return 0
