"""The paper's architecture ablation as a tool (MiniMax-01 §2.2: softmax vs lightning vs hybrid
vs hybrid with sliding-window softmax at matched parameters and compute).

A suite is a folder: `suite.toml` ([suite] runs, budget, the parameter-matching reference;
[data] the shared training corpus; [eval] what to measure) and one training TOML per run. Every
run trains on the same corpus (natural text mixed with synthetic retrieval documents, written
once to OUT/data/) for the same training FLOPs (tokens = budget / training FLOPs per token at
train.seq_len) or the same tokens; then each exported model is evaluated: loss by position up
to `factor` x the training length (perplexity.py), passkey / needle / MR-NIAH accuracy by length
and depth (retrieval.py), forward tokens/s by length; ablation_report.py writes the tables and
figures. Each phase resumes: trained runs are skipped, a half-trained one resumes from its
checkpoint (SIGTERM saves and stops, so the suite can run in time-boxed chunks), evaluated runs
are skipped."""

from __future__ import annotations

import json
import math
import random
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch

SUITE_KEYS = {"runs", "reference", "param_tolerance", "budget", "flops", "tokens"}
DATA_KEYS = {"text", "documents", "synthetic_fraction", "tasks", "min_length", "max_length",
             "heldout_characters", "seed", "natural_unit"}
EVAL_KEYS = {"tasks", "depths", "samples", "factor", "ppl_windows", "throughput_lengths",
             "batch_size", "seed"}


@dataclass
class Suite:
    folder: Path
    runs: dict                      # name -> RunConfig (its TOML)
    reference: str
    param_tolerance: float = 0.01
    budget: str = "flops"           # flops | tokens
    flops: float = 0.0
    tokens: float = 0.0
    data: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)

    def seq_len(self, name: str) -> int:
        return self.runs[name].train.seq_len

    def tokens_for(self, name: str) -> float:
        cfg = self.runs[name]
        if self.budget == "tokens":
            return self.tokens
        return self.flops / cfg.model.build().flops_per_token(cfg.train.seq_len, training=True)

    def steps_for(self, name: str) -> int:
        t = self.runs[name].train
        return max(1, math.ceil(self.tokens_for(name) / (t.batch_size * t.seq_len * t.grad_accum)))


def _check_keys(table: dict, allowed: set, where: str) -> None:
    import difflib

    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{where}: unknown key {key!r}{hint}")


def load_suite(folder: str | Path) -> Suite:
    from ..train.config_io import load_toml

    folder = Path(folder)
    path = folder / "suite.toml"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not an ablation suite (no suite.toml)")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None
    for section in raw:
        if section not in ("suite", "data", "eval"):
            raise ValueError(f"{path}: unknown section [{section}] (suite, data, eval)")
    s, d, e = raw.get("suite", {}), raw.get("data", {}), raw.get("eval", {})
    _check_keys(s, SUITE_KEYS, f"{path} [suite]")
    _check_keys(d, DATA_KEYS, f"{path} [data]")
    _check_keys(e, EVAL_KEYS, f"{path} [eval]")
    names = list(s.get("runs", []))
    if not names:
        raise ValueError(f"{path} [suite]: runs must list the runs' TOML names")
    runs = {}
    for name in names:
        cfg = load_toml(folder / f"{name}.toml")
        cfg.validate()
        runs[name] = cfg
    suite = Suite(folder, runs, s.get("reference", names[0]), float(s.get("param_tolerance", 0.01)),
                  s.get("budget", "flops"), float(s.get("flops", 0)), float(s.get("tokens", 0)),
                  d, e)
    if suite.reference not in runs:
        raise ValueError(f"{path} [suite]: reference {suite.reference!r} is not one of the runs")
    if suite.budget not in ("flops", "tokens") or (suite.flops if suite.budget == "flops"
                                                   else suite.tokens) <= 0:
        raise ValueError(f"{path} [suite]: budget must be 'flops' (with flops > 0) or 'tokens' "
                         f"(with tokens > 0)")
    first = names[0]
    for name, cfg in runs.items():  # matched: only the model may differ
        for section in ("data", "optim", "train", "parallel"):
            a, b = runs[first].to_dict()[section], cfg.to_dict()[section]
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            if diff:
                raise ValueError(f"{folder}/{name}.toml: [{section}] {diff[0]} differs from "
                                 f"{first}.toml; the runs of a suite differ only in [model]")
    return suite


def arithmetic(suite: Suite) -> list[dict]:
    """Parameters, FLOPs and the budget of every run, and their ratio to the reference."""
    ref = suite.runs[suite.reference].model.build()
    rows = []
    for name, cfg in suite.runs.items():
        m, t = cfg.model.build(), cfg.train
        fpt = m.flops_per_token(t.seq_len, training=True)
        tokens = suite.steps_for(name) * t.batch_size * t.seq_len * t.grad_accum
        rows.append({"run": name, "layers": _pattern(m), "params": m.num_parameters(),
                     "active_params": m.num_parameters(active=True),
                     "params_vs_reference": m.num_parameters() / ref.num_parameters() - 1,
                     "train_flops_per_token": fpt, "steps": suite.steps_for(name),
                     "tokens": tokens, "train_flops": fpt * tokens})
    return rows


def _pattern(m) -> str:
    parts = [f"{m.num_linear_layers} lightning"] if m.num_linear_layers else []
    if m.num_full_layers:
        parts.append(f"{m.num_full_layers} softmax")
    if m.num_sliding_layers:
        parts.append(f"{m.num_sliding_layers} sliding (W={m.sliding_window})")
    return " + ".join(parts)


def check_matched(suite: Suite) -> None:
    """Parameters within the suite's tolerance of the reference run's."""
    for row in arithmetic(suite):
        if abs(row["params_vs_reference"]) > suite.param_tolerance:
            raise ValueError(f"run {row['run']}: {row['params']:,} parameters, "
                             f"{100 * row['params_vs_reference']:+.2f}% from {suite.reference}; "
                             f"outside the suite's param_tolerance {suite.param_tolerance}")


# ---------------------------------------------------------------------- the corpus
def _natural_pieces(source: str, unit: str = "piece"):
    """Natural text from a data source, in file order: its units (text files: ~4 KiB pieces)
    or, with unit = "document", whole documents (a long-context corpus needs long ones)."""
    from ..train.data.sources import open_source

    if unit not in ("piece", "document"):
        raise ValueError(f"[data] natural_unit must be 'piece' or 'document', got {unit!r}")
    for shard in open_source(source):
        parts: list[str] = []
        for u in shard.units(0):
            if unit == "piece":
                if u.text.strip():
                    yield u.text
                continue
            if u.new_doc and parts:
                yield "".join(parts)
                parts = []
            parts.append(u.text)
            if u.ends_doc:
                yield "".join(parts)
                parts = []
        if parts and "".join(parts).strip():
            yield "".join(parts)


def write_corpus(spec: dict, out: Path) -> dict:
    """OUT/data/train.jsonl (natural pieces and synthetic retrieval documents, interleaved by a
    seeded coin) and OUT/data/heldout.txt (natural text never trained on, for perplexity).
    Written once; an existing complete corpus (corpus.json) is reused."""
    from .retrieval import make_task_example

    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "corpus.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta["spec"] == spec:
            return meta
        raise ValueError(f"{out} holds a corpus written with another [data] spec; use another "
                         f"--out")
    rng = random.Random(f"minimax01-ablation-corpus/{spec.get('seed', 0)}")
    docs = int(spec.get("documents", 2000))
    frac = float(spec.get("synthetic_fraction", 0.5))
    tasks = list(spec.get("tasks", ["passkey", "needle", "mrniah"]))
    lo, hi = int(spec.get("min_length", 200)), int(spec.get("max_length", 1024))
    if not (0 <= frac <= 1 and docs > 0 and 160 <= lo <= hi):
        raise ValueError("[data]: need documents > 0, 0 <= synthetic_fraction <= 1 and "
                         "160 <= min_length <= max_length")
    pieces = (p for p in _natural_pieces(spec.get("text", "stdlib"),
                                         spec.get("natural_unit", "piece")) if p.strip())
    counts = {"natural": 0, **{t: 0 for t in tasks}}
    with open(out / "train.jsonl.tmp", "w") as f:
        for i in range(docs):
            if tasks and rng.random() < frac:
                task = tasks[i % len(tasks)]
                ex = make_task_example(task, i, int(spec.get("seed", 0)), rng.randint(lo, hi),
                                       rng.random())
                text = ex.text
                counts[task] += 1
            else:
                text = next(pieces, None)
                if text is None:
                    raise ValueError(f"[data] text {spec.get('text')!r} ran out after "
                                     f"{counts['natural']} pieces; lower documents")
                counts["natural"] += 1
            f.write(json.dumps({"text": text}) + "\n")
    held, size = [], 0
    need = int(spec.get("heldout_characters", 200_000))
    for text in pieces:  # what the training corpus did not use
        held.append(text)
        size += len(text)
        if size >= need:
            break
    if size < need:
        raise ValueError(f"[data] text {spec.get('text')!r}: only {size} held-out characters left "
                         f"(heldout_characters = {need})")
    (out / "heldout.txt").write_text("".join(held))
    (out / "train.jsonl.tmp").replace(out / "train.jsonl")
    meta = {"spec": spec, "documents": docs, "counts": counts, "heldout_characters": size}
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


# ---------------------------------------------------------------------- training
def run_config(suite: Suite, name: str, out: Path):
    from ..train.config_io import from_dict, set_value

    cfg = from_dict(suite.runs[name].to_dict())
    for key, value in (("data.source", str(out / "data" / "train.jsonl")), ("data.format", "jsonl"),
                       ("train.out_dir", str(out / "runs" / name)),
                       ("train.steps", suite.steps_for(name)), ("train.export", True)):
        set_value(cfg, key, value)
    return cfg


def train_run(suite: Suite, name: str, out: Path, log=print) -> int | None:
    """Train (or resume, or skip) one run; returns the signal that stopped it, if any."""
    from ..train import checkpointing as ckpt
    from ..train.trainer import Trainer

    cfg = run_config(suite, name, out)
    run_dir = Path(cfg.train.out_dir)
    latest = ckpt.latest_checkpoint(run_dir)
    if (run_dir / "model" / "config.json").is_file() and latest is not None \
            and ckpt.read_state(latest)["step"] >= cfg.train.steps:
        log(f"[{name}] trained ({cfg.train.steps} steps): skipped")
        return None
    log(f"[{name}] training {cfg.train.steps} steps of {cfg.train.batch_size} x "
        f"{cfg.train.seq_len} tokens")
    trainer = Trainer(cfg)
    try:
        result = trainer.fit()
    finally:
        trainer.world.shutdown()
    return result.stopped_by_signal


# ---------------------------------------------------------------------- evaluation
@torch.inference_mode()
def forward_throughput(model, lengths: list[int], repeats: int = 5) -> dict[int, float]:
    """Tokens/s of one forward pass (batch 1, the model's own path) at each length, the best of
    `repeats` (robust to a busy machine): the quantity whose flatness in length is lightning
    attention's selling point."""
    device = next(model.parameters()).device
    out = {}
    for n in lengths:
        x = torch.randint(0, 256, (1, n), device=device)
        model(x, logits_to_keep=1)  # warm-up
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            model(x, logits_to_keep=1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        out[n] = n / min(times)
    return out


def _training_summary(run_dir: Path) -> dict:
    from ..train.metrics import read_metrics

    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    speeds = [r["tokens_per_s"] for r in train[1:]] or [r["tokens_per_s"] for r in train]
    return {"curve": [{"step": r["step"], "tokens": r["tokens"], "loss": r["loss"]} for r in train],
            "eval_curve": [{"step": r["step"], "eval_loss": r["eval_loss"]} for r in evals],
            "final_loss": train[-1]["loss"] if train else None,
            "eval_loss": evals[-1]["eval_loss"] if evals else None,
            "train_tokens_per_s": sum(speeds) / len(speeds) if speeds else None}


def evaluate_run(suite: Suite, name: str, out: Path, device: str | None = None, log=print) -> dict:
    """Every evaluation of one trained run, written to OUT/evals/NAME.json (skipped when there)."""
    from ..model import MiniMaxForCausalLM
    from ..tokenizer import load_tokenizer
    from .perplexity import perplexity
    from .retrieval import MIN_LENGTH, evaluate_retrieval, extrapolation_lengths

    path = out / "evals" / f"{name}.json"
    if path.is_file():
        log(f"[{name}] evaluated: skipped")
        return json.loads(path.read_text())
    e = suite.eval
    run_dir = out / "runs" / name
    if not (run_dir / "model" / "config.json").is_file():
        raise ValueError(f"run {name} has not finished training (no {run_dir}/model)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = MiniMaxForCausalLM.from_pretrained(run_dir / "model", device=device).eval()
    tok = load_tokenizer(run_dir / "model")
    length = suite.seq_len(name)
    factor = float(e.get("factor", 4))
    result = {"run": name, "train_length": length, "training": _training_summary(run_dir)}
    log(f"[{name}] loss by position up to {factor:g}x the training length")
    ids = tok.encode((out / "data" / "heldout.txt").read_text())
    context = int(length * factor)
    ppl = perplexity(model, ids, context, chunk=max(length, 1024),
                     max_windows=int(e.get("ppl_windows", 4)), bucket_base=2)
    result["ppl"] = {"context": context, "nll": ppl.nll, "tokens": ppl.tokens,
                     "buckets": [{"lo": a, "hi": b, "nll": c, "tokens": n}
                                 for a, b, c, n in ppl.buckets]}
    lengths = extrapolation_lengths(length, factor)
    result["retrieval"] = {}
    (out / "evals" / name).mkdir(parents=True, exist_ok=True)
    for task in e.get("tasks", ["passkey", "needle", "mrniah"]):
        task_lengths = [n for n in lengths if n >= MIN_LENGTH[task]]
        log(f"[{name}] {task} at lengths {task_lengths}")
        r = evaluate_retrieval(model, tok, task, task_lengths, list(e.get("depths", [0.0, 0.5, 1.0])),
                               int(e.get("samples", 2)), int(e.get("seed", 0)),
                               int(e.get("batch_size", 4)), train_length=length)
        d = r.to_dict()
        (out / "evals" / name / f"{task}.json").write_text(json.dumps(d))  # per-sample scores
        d.pop("samples")
        result["retrieval"][task] = d
    tlens = [int(n) for n in e.get("throughput_lengths", [length // 2, length, 2 * length,
                                                          4 * length])]
    log(f"[{name}] forward tokens/s at {tlens}")
    result["forward_tokens_per_s"] = {str(k): v for k, v in forward_throughput(model, tlens).items()}
    result["device"] = str(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def main(argv=None) -> int:
    """`python -m minimax01.eval.ablation corpus FILE.toml OUT_DIR`: write the corpus a [data]
    table describes (train.jsonl, heldout.txt, corpus.json), e.g. for a context-extension run."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m minimax01.eval.ablation")
    p.add_argument("action", choices=["corpus"])
    p.add_argument("spec", help="a TOML file with a [data] table (a suite.toml works)")
    p.add_argument("out_dir")
    args = p.parse_args(argv)
    try:
        raw = tomllib.loads(Path(args.spec).read_text())
        spec = raw.get("data", {})
        _check_keys(spec, DATA_KEYS, f"{args.spec} [data]")
        meta = write_corpus(spec, Path(args.out_dir))
    except (OSError, ValueError, tomllib.TOMLDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"corpus in {args.out_dir}: {meta['documents']} documents {meta['counts']}, "
          f"{meta['heldout_characters']} held-out characters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
