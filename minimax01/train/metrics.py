"""What a run reports: `out_dir/metrics.jsonl` (one JSON record per logged step or evaluation),
a tqdm progress bar (plain log lines when stderr is not a terminal), TensorBoard when installed,
and the hardware numbers behind them (peak FLOP/s for MFU, memory)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks from the datasheets (no sparsity), FLOP/s.
DATASHEET_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12,
                        "A800": 312e12, "L40S": 362e12, "B200": 2250e12}


def datasheet_peak_flops(device: torch.device) -> float | None:
    """The card's dense bf16 datasheet peak, or None (CPU, unknown card). H100 means SXM."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in DATASHEET_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated (CUDA), else this process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform != "darwin" else rss / 2**30
    except ImportError:  # Windows
        return 0.0


def truncate_metrics(path: Path, lines: int | None, last_step: int = 0) -> int:
    """Keep the first `lines` records, as many as the file held when the checkpoint being
    resumed was saved: what came after is logged again by the resumed run, so no record is ever
    there twice. `lines=None` (a checkpoint of an older minimax01) keeps the records up to
    `last_step` instead. Drops a half-written last line. Atomic; returns the records kept."""
    if not path.is_file():
        return 0
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        if lines is not None and len(kept) >= lines:
            break
        if lines is not None or record.get("step", 0) <= last_step:
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
    return len(kept)


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class MetricsLogger:
    """Writes records on the main process only; every method is a no-op elsewhere."""

    def __init__(self, out_dir: Path, enabled: bool, total_steps: int, initial_step: int,
                 progress: bool = True, tensorboard: bool = True, lines: int = 0):
        self.enabled = enabled
        self.file = None
        self.bar = None
        self.tb = None
        self.lines = lines  # records in metrics.jsonl (saved in checkpoints, see truncate_metrics)
        if not enabled:
            return
        self.file = open(out_dir / "metrics.jsonl", "a", buffering=1)
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step",
                            dynamic_ncols=True, smoothing=0.1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))
            except (ImportError, ModuleNotFoundError):
                self.tb = None

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def record(self, record: dict) -> None:
        """Append one record to metrics.jsonl (flushed line by line) and to TensorBoard."""
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.lines += 1
        if self.tb is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, step)
                elif key.startswith("moe_") and isinstance(value, list):
                    for layer, v in enumerate(value):
                        if isinstance(v, (int, float)):
                            self.tb.add_scalar(f"{key}/layer{layer}", v, step)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def show(self, summary: dict, step: int, total: int) -> None:
        """A log line (above the progress bar, which also shows the numbers)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(summary, refresh=False)
        self.print(f"step {step}/{total} " + " ".join(f"{k} {v}" for k, v in summary.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def summary(record: dict) -> dict:
    """The few numbers the progress bar shows."""
    out = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}",
           "tok/s": f"{record['tokens_per_s']:.0f}"}
    if "mfu" in record:
        out["mfu"] = f"{100 * record['mfu']:.1f}%"
    out["mem"] = f"{record['memory_gib']:.1f}G"
    return out


class IntervalStats:
    """Sums over the steps between two log records, kept on the device (no host syncs)."""

    def __init__(self, layers: int, experts: int, device):
        self.lm = torch.zeros((), dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.aux = torch.zeros((), dtype=torch.float64, device=device)
        self.moe_load = torch.zeros(layers, experts, dtype=torch.float64, device=device)
        self.moe_drop = torch.zeros(layers, 2, dtype=torch.float64, device=device)
        self.grad_norm = None
        self.steps = self.skipped = self.tokens = 0
        self.extra: dict[str, torch.Tensor] = {}  # name -> [sum, count] (post-training metrics)

    def add_extra(self, name: str, value, count) -> None:
        pair = torch.stack([torch.as_tensor(value, dtype=torch.float64, device=self.lm.device),
                            torch.as_tensor(count, dtype=torch.float64, device=self.lm.device)])
        self.extra[name] = self.extra[name] + pair if name in self.extra else pair

    def add_moe(self, stats) -> None:
        for i, s in enumerate(stats):
            if s is None:
                continue
            n = float(s.assignments)
            self.moe_load[i] += s.load.to(self.moe_load) * n
            dropped = torch.as_tensor(s.dropped, dtype=torch.float64, device=self.moe_drop.device)
            self.moe_drop[i, 0] += dropped
            self.moe_drop[i, 1] += n

    def add_step(self, lm_sum, count, aux, grad_norm, tokens: int) -> None:
        self.lm += lm_sum
        self.count += count
        self.aux += aux
        self.grad_norm = grad_norm
        self.steps += 1
        self.tokens += tokens

    def record(self, step, lr, tokens, elapsed, world, reduce) -> dict | None:
        if self.steps == 0:
            return None
        moe = reduce(torch.cat([self.moe_load, self.moe_drop], 1))
        e = self.moe_load.shape[1]
        load = moe[:, :e] / moe[:, :e].sum(1, keepdim=True).clamp(min=1)
        drop = moe[:, e] / moe[:, e + 1].clamp(min=1)
        rec = {"step": step, "loss": float(self.lm / self.count), "lr": lr, "tokens": tokens,
               "tokens_per_s": self.tokens / max(elapsed, 1e-9),
               "aux_loss": float(self.aux / self.steps), "grad_norm": float(self.grad_norm),
               "moe_load": [[round(x, 4) for x in row] for row in load.tolist()],
               "moe_drop_rate": [round(x, 5) for x in drop.tolist()]}
        if self.extra:  # each the mean over its own counts, all ranks
            names = sorted(self.extra)
            sums = reduce(torch.stack([self.extra[n] for n in names]))
            rec.update({n: float(s / c) if c else None for n, (s, c) in zip(names, sums.tolist())})
        if self.skipped:
            rec["skipped"] = self.skipped
        return rec
