"""Tables (markdown + JSON) and figures of an ablation suite's results (ablation.py): the
arithmetic (parameters, FLOPs, budget), loss by step (as shares of the budget) and by position,
retrieval accuracy by length (extrapolation marked) with significance against the reference run
(paired t + bootstrap over the same samples), and tokens/s (training, and a forward pass by
length)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from . import power
from .ablation import Suite, arithmetic


def _fmt(x, digits=4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _count(n: float) -> str:
    for unit, name in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= unit:
            return f"{n / unit:.2f}{name}"
    return f"{n:.0f}"


def loss_at(curve: list[dict], fraction: float) -> float | None:
    """Train loss at `fraction` of the run's tokens, interpolated linearly between the logged
    records (runs of one suite log at different token counts); the first record's loss before
    it."""
    if not curve:
        return None
    target = fraction * curve[-1]["tokens"]
    prev = curve[0]
    for r in curve:
        if r["tokens"] >= target - 1e-9:
            if r is prev or r["tokens"] == prev["tokens"]:
                return r["loss"]
            w = (target - prev["tokens"]) / (r["tokens"] - prev["tokens"])
            return prev["loss"] + w * (r["loss"] - prev["loss"])
        prev = r
    return curve[-1]["loss"]


def _scores(out: Path, run: str, task: str) -> tuple | None:
    path = out / "evals" / run / f"{task}.json"
    return power.load_scores(path) if path.is_file() else None


def build(suite: Suite, out: Path, results: dict[str, dict]) -> dict:
    """Everything the tables show, as one JSON-able dict."""
    ref = suite.reference
    report = {"reference": ref, "budget": suite.budget, "arithmetic": arithmetic(suite),
              "runs": {}}
    ref_loss = results[ref]["training"]["eval_loss"] if ref in results else None
    for name, r in results.items():
        tr = r["training"]
        row = {"final_loss": tr["final_loss"], "eval_loss": tr["eval_loss"],
               "loss_at": {f"{int(100 * f)}%": loss_at(tr["curve"], f) for f in (0.25, 0.5, 0.75, 1.0)},
               "eval_loss_vs_reference": (tr["eval_loss"] / ref_loss - 1) if ref_loss and tr["eval_loss"] else None,
               "train_tokens_per_s": tr["train_tokens_per_s"],
               "forward_tokens_per_s": r["forward_tokens_per_s"],
               "ppl_buckets": r["ppl"]["buckets"], "train_length": r["train_length"],
               "retrieval": {}}
        for task, d in r["retrieval"].items():
            entry = {"accuracy": d["accuracy"], "by_length": d["by_length"],
                     "beyond_train": _beyond(d, r["train_length"])}
            a, b = _scores(out, ref, task), _scores(out, name, task)
            if name != ref and a is not None and b is not None and len(a[1]) > 1:
                cmp = power.compare(*power.aligned(a, b), resamples=5000)
                entry["vs_reference"] = {"diff": cmp.diff, "p_t": cmp.p_t,
                                         "p_bootstrap": cmp.p_bootstrap,
                                         "significant": cmp.significant}
            row["retrieval"][task] = entry
        report["runs"][name] = row
    return report


def _beyond(d: dict, train_length: int) -> float:
    cells = [g for g in d["grid"] if g["length"] > train_length]
    n = sum(g["total"] for g in cells)
    return sum(g["correct"] for g in cells) / n if n else float("nan")


def markdown(report: dict) -> str:
    lines = [f"# Ablation: {', '.join(report['runs'])} (reference {report['reference']})", ""]
    lines += ["## Parameters and compute", "",
              "run | layers | params | vs ref | active | train FLOPs/token | steps | tokens | "
              "train FLOPs", "---|---|---|---|---|---|---|---|---"]
    for a in report["arithmetic"]:
        lines.append(f"{a['run']} | {a['layers']} | {a['params']:,} | "
                     f"{100 * a['params_vs_reference']:+.2f}% | {a['active_params']:,} | "
                     f"{_count(a['train_flops_per_token'])} | {a['steps']} | {_count(a['tokens'])} | "
                     f"{_count(a['train_flops'])}")
    runs = report["runs"]
    lines += ["", "## Loss by step (train loss at a share of the budget; held-out loss at the end)",
              "", "run | 25% | 50% | 75% | 100% | held-out | vs ref", "---|---|---|---|---|---|---"]
    for name, r in runs.items():
        la = r["loss_at"]
        vs = r["eval_loss_vs_reference"]
        lines.append(f"{name} | {_fmt(la['25%'])} | {_fmt(la['50%'])} | {_fmt(la['75%'])} | "
                     f"{_fmt(la['100%'])} | {_fmt(r['eval_loss'])} | "
                     f"{'-' if vs is None else f'{100 * vs:+.2f}%'}")
    first = next(iter(runs.values()))
    buckets = [(b["lo"], b["hi"]) for b in first["ppl_buckets"]]
    length = first["train_length"]
    lines += ["", f"## Loss by position (held-out text; training length {length}; * = beyond it)",
              "", "run | " + " | ".join(f"[{lo},{hi}){'*' if lo >= length else ''}"
                                         for lo, hi in buckets),
              "|".join(["---"] * (len(buckets) + 1))]
    for name, r in runs.items():
        by = {(b["lo"], b["hi"]): b["nll"] for b in r["ppl_buckets"]}
        lines.append(f"{name} | " + " | ".join(_fmt(by.get(k), 3) for k in buckets))
    tasks = list(first["retrieval"])
    for task in tasks:
        lens = list(first["retrieval"][task]["by_length"])
        lines += ["", f"## {task}: accuracy by context length (* = beyond the training length)", "",
                  "run | " + " | ".join(f"{n}{'*' if int(n) > length else ''}" for n in lens)
                  + " | all | beyond | vs ref (p)", "|".join(["---"] * (len(lens) + 4))]
        for name, r in runs.items():
            e = r["retrieval"][task]
            vs = e.get("vs_reference")
            sig = "-" if vs is None else (f"{vs['diff']:+.3f} (t {vs['p_t']:.3g}, boot "
                                          f"{vs['p_bootstrap']:.3g}){' *' if vs['significant'] else ''}")
            lines.append(f"{name} | " + " | ".join(_fmt(e["by_length"][n], 2) for n in lens)
                         + f" | {_fmt(e['accuracy'], 2)} | {_fmt(e['beyond_train'], 2)} | {sig}")
    tl = list(first["forward_tokens_per_s"])
    lines += ["", "## Throughput (tokens/s)", "",
              "run | training | " + " | ".join(f"forward @{n}" for n in tl) + " | @max / @min",
              "|".join(["---"] * (len(tl) + 3))]
    for name, r in runs.items():
        f = r["forward_tokens_per_s"]
        ratio = f[tl[-1]] / f[tl[0]] if f[tl[0]] else float("nan")
        lines.append(f"{name} | {_fmt(r['train_tokens_per_s'], 0)} | "
                     + " | ".join(f"{f[n]:.0f}" for n in tl) + f" | {ratio:.2f}")
    return "\n".join(lines) + "\n"


def figures(report: dict, out: Path, results: dict[str, dict]) -> list[Path]:
    from .plots import comparison_figure, retrieval_figure, save_png
    from .retrieval import RetrievalResult

    written = []
    runs = report["runs"]
    fpt = {a["run"]: a["train_flops_per_token"] for a in report["arithmetic"]}
    curves = {n: ([c["tokens"] * fpt[n] for c in results[n]["training"]["curve"]],
                  [c["loss"] for c in results[n]["training"]["curve"]]) for n in runs}
    written.append(save_png(comparison_figure(curves, "training FLOPs", "train loss",
                                              "loss by compute"), out / "loss_by_flops.png"))
    length = next(iter(runs.values()))["train_length"]
    pos = {n: ([b["hi"] for b in r["ppl_buckets"]], [b["nll"] for b in r["ppl_buckets"]])
           for n, r in runs.items()}
    written.append(save_png(comparison_figure(pos, "position (bucket end)", "loss (nats/token)",
                                              "loss by position", logx=True, train_length=length),
                            out / "loss_by_position.png"))
    for task in next(iter(runs.values()))["retrieval"]:
        acc = {n: ([int(k) for k in r["retrieval"][task]["by_length"]],
                   list(r["retrieval"][task]["by_length"].values())) for n, r in runs.items()}
        written.append(save_png(comparison_figure(acc, "context length", "accuracy",
                                                  f"{task}: accuracy by length", logx=True,
                                                  train_length=length, ylim=(-0.05, 1.05)),
                                out / f"{task}_by_length.png"))
        grids = []
        for n in runs:
            d = json.loads((out / "evals" / n / f"{task}.json").read_text())
            res = RetrievalResult(task, d["lengths"], d["depths"], train_length=d["train_length"])
            for g in d["grid"]:
                res.correct[(g["length"], g["depth"])] = g["correct"]
                res.total[(g["length"], g["depth"])] = g["total"]
            grids.append(res)
        written.append(save_png(retrieval_figure(grids, list(runs), f"{task}: length x depth"),
                                out / f"{task}_heatmaps.png"))
    tput = {n: ([int(k) for k in r["forward_tokens_per_s"]], list(r["forward_tokens_per_s"].values()))
            for n, r in runs.items()}
    written.append(save_png(comparison_figure(tput, "sequence length", "forward tokens/s",
                                              "throughput by length", logx=True,
                                              train_length=length), out / "throughput.png"))
    return written


def write(suite: Suite, out: Path, results: dict[str, dict], plots: bool = True) -> dict:
    report = build(suite, out, results)
    (out / "ablation.json").write_text(json.dumps(report, indent=1))
    (out / "ablation.md").write_text(markdown(report))
    if plots:
        report["figures"] = [str(p) for p in figures(report, out, results)]
    return report
