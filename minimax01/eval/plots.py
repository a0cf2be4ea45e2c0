"""Figures (matplotlib, the optional `plot` extra): the paper-style retrieval heatmap (context
length x depth), accuracy-by-length and loss-by-position curves, a run's training curves from
metrics.jsonl (loss, held-out loss, throughput, MoE load, learning rate) and ablation comparisons.

Each `*_figure` function returns a matplotlib Figure (object API, no pyplot, no global backend
state) so callers and tests can inspect the drawn series before `save_png` writes it."""

from __future__ import annotations

import math
from pathlib import Path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _figure(rows: int, cols: int, width: float = 5.0, height: float = 3.6):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ValueError("plots need matplotlib: pip install 'minimax01[plot]'") from None
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def save_png(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write `fig` as a PNG (folders created) and check what was written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    with open(path, "rb") as f:
        if f.read(8) != PNG_MAGIC:
            raise ValueError(f"{path}: matplotlib did not write a PNG")
    return path


def png_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    data = Path(path).read_bytes()[:24]
    if data[:8] != PNG_MAGIC or data[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _train_line(ax, train_length, vertical=True) -> None:
    if train_length:
        ax.axvline(train_length, color="grey", linestyle="--", linewidth=1,
                   label="training length")


# ---------------------------------------------------------------------- evaluations
def heatmap(ax, result, title: str | None = None) -> None:
    """Mean score per (depth, length) cell, green = retrieved, red = not (paper style)."""
    grid = result.grid()
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
    ax.set_xticks(range(len(result.lengths)), [_k(n) for n in result.lengths], rotation=45)
    ax.set_yticks(range(len(result.depths)), [f"{100 * d:.0f}%" for d in result.depths])
    ax.set_xlabel("context length" + (" (chars)" if result.task else ""))
    ax.set_ylabel("depth of the fact")
    if result.train_length:
        inside = [i for i, n in enumerate(result.lengths) if n <= result.train_length]
        if inside and inside[-1] < len(result.lengths) - 1:
            ax.axvline(inside[-1] + 0.5, color="black", linewidth=1.5, label="training length")
    for y, row in enumerate(grid):
        for x, v in enumerate(row):
            if not math.isnan(v):
                ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=7)
    ax.set_title(title or f"{result.task}: {result.accuracy():.2f}")
    ax.figure.colorbar(im, ax=ax, shrink=0.8)


def _length_axis(ax, ticks) -> None:
    """Log2 axis with the data's own lengths as ticks (256, 1K, 4K ...)."""
    ax.set_xscale("log", base=2)
    ticks = [t for t in ticks if t > 0]
    if 0 < len(ticks) <= 12 and all(float(t).is_integer() for t in ticks):
        ax.set_xticks(ticks, [_k(int(t)) for t in ticks])
        ax.minorticks_off()


def _k(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def retrieval_figure(results, labels: list[str] | None = None, title: str | None = None):
    """One heatmap per result, then accuracy by length with one line per result."""
    results = list(results) if isinstance(results, (list, tuple)) else [results]
    labels = labels or [r.task for r in results]
    fig, axes = _figure(1, len(results) + 1)
    for ax, r, name in zip(axes, results, labels):
        heatmap(ax, r, f"{name}: {r.accuracy():.2f}")
    ax = axes[-1]
    for r, name in zip(results, labels):
        ax.plot(r.lengths, [r.accuracy(n) for n in r.lengths], marker="o", label=name)
    _train_line(ax, next((r.train_length for r in results if r.train_length), None))
    _length_axis(ax, sorted({n for r in results for n in r.lengths}))
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("context length")
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy by length")
    ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def ppl_figure(results: dict, train_length: int | None = None, title: str | None = None):
    """Loss by position bucket, one line per result (a dict label -> PerplexityResult)."""
    fig, (ax,) = _figure(1, 1, 6.0, 4.0)
    for name, r in results.items():
        xs = [max(hi, 1) for lo, hi, _, _ in r.buckets]
        ax.plot(xs, [nll for _, _, nll, _ in r.buckets], marker="o", label=name)
    _train_line(ax, train_length)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position (bucket end)")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title or "loss by position")
    ax.legend(fontsize=8)
    return fig


# ---------------------------------------------------------------------- training runs
def run_figure(records: list[dict], title: str | None = None, boundaries: list | None = None):
    """Training curves from metrics.jsonl records: lm loss and held-out loss, tokens/s, MoE load
    (the busiest expert's share x experts: 1 = balanced; layer mean and worst layer), LR.
    `boundaries`: [(step, label)] drawn as vertical lines (context-extension stages)."""
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    if not train and not evals:
        raise ValueError("no loss records to plot")
    fig, axes = _figure(2, 2)
    ax = axes[0]
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], marker="o",
                label="held-out loss")
    ax.set_title("loss")
    ax.set_ylabel("nats / token")
    ax = axes[1]
    ax.plot([r["step"] for r in train], [r.get("tokens_per_s", float("nan")) for r in train],
            label="tokens/s")
    ax.set_title("throughput")
    ax.set_ylabel("tokens / s")
    ax = axes[2]
    moe = [r for r in train if r.get("moe_load")]
    if moe:
        def imbalance(rec):
            return [max(layer) * len(layer) for layer in rec["moe_load"]]
        ax.plot([r["step"] for r in moe], [sum(imbalance(r)) / len(imbalance(r)) for r in moe],
                label="mean over layers")
        ax.plot([r["step"] for r in moe], [max(imbalance(r)) for r in moe], label="worst layer")
        ax.axhline(1.0, color="grey", linestyle=":", linewidth=1, label="balanced")
    ax.set_title("MoE load (max expert share x experts)")
    ax = axes[3]
    ax.plot([r["step"] for r in train], [r.get("lr", float("nan")) for r in train],
            label="learning rate")
    ax.set_title("learning rate")
    for ax in axes:
        for step, name in boundaries or []:
            ax.axvline(step, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel("step")
        if ax.get_lines():
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def comparison_figure(curves: dict, xlabel: str, ylabel: str, title: str, logx: bool = False,
                      train_length: int | None = None, ylim=None):
    """One line per named series: {name: (xs, ys)}."""
    fig, (ax,) = _figure(1, 1, 6.0, 4.0)
    for name, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=name)
    _train_line(ax, train_length)
    if logx:
        _length_axis(ax, sorted({x for xs, _ in curves.values() for x in xs}))
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def line_labels(fig) -> list[list[str]]:
    """The labelled lines of every axes (for tests and checks), axes by axes."""
    return [[ln.get_label() for ln in ax.get_lines() if not ln.get_label().startswith("_")]
            for ax in fig.axes if ax.get_label() != "<colorbar>"]
