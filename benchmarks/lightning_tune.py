"""Sweep the schedules of our Triton lightning kernels on this GPU and pick its tuning table.

    python benchmarks/lightning_tune.py --out DIR [--budget-s 200]

(`benchmarks/lightning.py --tune` runs this inside the full benchmark.) Every candidate is a
schedule of the same arithmetic (tests/test_lightning_tuning.py), so only time decides. Stages,
each on the issue's rows (bf16, D = E = 128), best-first, stopped by the time budget:

  fwd    forward tiles (block_t, block_v, warps, stages, TMA) on fwd H64 T16K, the best three on
         every forward row; chosen by the geometric mean of time / default over the rows
  state  tiles of the local-state pass, on the split rows (H8)
  split  programs per SM of a split sequence (H8 T64K/256K forward+backward)
  bwd    dq / reverse-scan tiles on fwd+bwd H64 T16K, the best two on every backward row
  fused  the fused dk+dv pass (all of E per program) against the separate passes
  lpt    longest-first order of packed documents
  decode value slice / warps / evict-first per batch (1, 16, 64, 256) under CUDA-graph replay

Kernels of all candidates are compiled first by a pool of processes (Triton's disk cache), so
the sweep itself mostly measures. Writes DIR/lightning_tuning.json ({card: Tuning fields}, load
it with MINIMAX01_LIGHTNING_TUNING or `triton_tune.load`) and DIR/lightning_sweep.json (every
measurement), and prints the Python line for triton_tune.SHIPPED."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing as mp
import os
import sys
import time

import torch

from minimax01.ops import lightning_attn
from minimax01.ops.lightning import lightning_slopes, triton_plan, triton_tune
from minimax01.ops.lightning.triton_tune import Tiles, Tuning

DT = torch.bfloat16
D = E = 128


def T(bt, bv, nw, ns, tma=False):
    return Tiles(block_t=bt, block_v=bv, num_warps=nw, num_stages=ns, tma=tma)


# Pruned offline: compiled for sm_90 with Triton 3.6 (no GPU), candidates that spill more than a
# few bytes or cannot keep two programs per SM were dropped (docs/kernels.md).
FWD = [T(64, 32, 4, 3), T(64, 32, 4, 3, True), T(64, 32, 4, 2), T(64, 32, 4, 4), T(64, 32, 8, 3),
       T(64, 16, 4, 3), T(64, 16, 4, 3, True), T(64, 64, 8, 2), T(64, 64, 8, 3),
       T(64, 64, 8, 3, True), T(32, 32, 4, 3, True), T(64, 128, 8, 2)]
STATE = [T(64, 32, 4, 3), T(64, 64, 8, 3), T(64, 128, 8, 2), T(64, 64, 4, 3, True)]
BWD = [T(64, 32, 4, 3), T(64, 32, 4, 3, True), T(64, 32, 4, 2), T(64, 32, 8, 3), T(64, 16, 4, 3),
       T(64, 64, 8, 2), T(64, 64, 8, 3), T(64, 64, 8, 3, True)]
FUSED = [T(64, 128, 8, 2), T(64, 128, 8, 2, True), T(32, 128, 8, 2)]
PPS = [1.0, 2.0, 3.0, 4.0]
DECODE_BATCHES = [1, 16, 64, 256]
DECODE = [(16, 2, 0), (32, 2, 0), (32, 4, 0), (64, 4, 0), (64, 8, 0), (64, 8, 1), (128, 4, 0),
          (128, 8, 0), (128, 8, 1)]


def packed_lens(total=65536, n=22, seed=0):
    """22 documents of random lengths (64 .. 8K) that add up to `total`."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, generator=g) + 0.05
    lens = (w / w.sum() * total).long().clamp(min=64)
    lens[-1] += total - int(lens.sum())
    return [int(x) for x in lens]


# (name, B, T, H, packed lens or None, backward)
FWD_ROWS = [("fwd H64 T4K", 1, 4096, 64, None), ("fwd H64 T16K", 1, 16384, 64, None),
            ("fwd H64 T64K", 1, 65536, 64, None), ("fwd H8 T64K", 1, 65536, 8, None),
            ("fwd H8 T256K", 1, 262144, 8, None), ("fwd packed 22 docs T64K H64", 1, 65536, 64, "p"),
            ("fwd B8 T8K H64", 8, 8192, 64, None)]
BWD_ROWS = [(n.replace("fwd", "fwd+bwd"), b, t, h, p) for n, b, t, h, p in FWD_ROWS]
SPLIT_ROWS = [r for r in BWD_ROWS if r[3] == 8]


def make(b, t, h, lens, grad, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed + t * h)
    q, k = (torch.randn(b, t, h, D, device="cuda", generator=g, dtype=DT) * 0.3 for _ in range(2))
    v = torch.randn(b, t, h, E, device="cuda", generator=g, dtype=DT)
    slope = lightning_slopes(h, 1, 80).cuda()
    cu = None
    if lens == "p":
        lens = packed_lens(t)
    if lens is not None:
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32,
                          device="cuda")
    if grad:
        for x in (q, k, v):
            x.requires_grad_()
    return q, k, v, slope, cu


def bench(fn, grad_to_none=None, rep=40):
    from triton.testing import do_bench
    return do_bench(fn, warmup=8, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def op_fn(q, k, v, slope, cu, backward):
    if not backward:
        def run():
            with torch.no_grad():
                return lightning_attn(q, k, v, slope, cu_seqlens=cu, backend="triton")[0]
        return run
    do = torch.randn_like(v)

    def run():
        o = lightning_attn(q, k, v, slope, cu_seqlens=cu, backend="triton")[0]
        o.backward(do)
    return run


def tuning_override(tn: Tuning) -> dict:
    """The override dict that makes the op use `tn` whatever the shipped table says."""
    ov = {}
    for kind in ("fwd", "state", "dq", "rev"):
        for f in dataclasses.fields(Tiles):
            ov[f"{kind}_{f.name}"] = getattr(getattr(tn, kind), f.name)
    if tn.fused is not None:
        for f in dataclasses.fields(Tiles):
            ov[f"fused_{f.name}"] = getattr(tn.fused, f.name)
    ov["fused"] = tn.fused is not None
    for name in ("split_threshold", "programs_per_sm", "fused_programs_per_sm", "min_seg", "lpt"):
        ov[name] = getattr(tn, name)
    return ov


def time_row(row, tn: Tuning, backward, rep=40):
    name, b, t, h, lens = row
    q, k, v, slope, cu = make(b, t, h, lens, backward)
    with triton_plan.override(**tuning_override(tn)):
        fn = op_fn(q, k, v, slope, cu, backward)
        fn()
        torch.cuda.synchronize()
        return bench(fn, grad_to_none=[q, k, v] if backward else None, rep=rep)


# ---- parallel compile ------------------------------------------------------------------------

def _warm_worker(jobs):
    """Compile by running tiny problems with the same specialisations (H 64 / 8, packed modes,
    split and unsplit) under each candidate tuning: fills Triton's disk cache."""
    torch.cuda.set_device(0)
    done = 0
    for tn_json, backward in jobs:
        tn = Tuning.from_json(tn_json)
        for b, t, h, lens, extra in ((1, 1024, 64, None, {}), (1, 4096, 8, None, dict(seg_len=1024)),
                                     (1, 2048, 64, [1000, 1048], {}),
                                     (1, 4096, 8, [3000, 1096], dict(seg_len=1024))):
            try:
                q, k, v, slope, cu = make(b, t, h, lens, backward)
                with triton_plan.override(**tuning_override(tn), **extra):
                    op_fn(q, k, v, slope, cu, backward)()
                done += 1
            except Exception as exc:  # the sweep will report it
                print(f"  [warm: {type(exc).__name__}: {str(exc)[:100]}]", flush=True)
    torch.cuda.synchronize()
    return done


def _warm_fla(_):
    """fla's autotuned kernels, compiled at the sweep's specialisations (H 64 / 8, packed)."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception:
        return 0
    torch.cuda.set_device(0)
    n = 0
    for b, t, h, lens in ((1, 1024, 64, None), (1, 4096, 8, None), (1, 2048, 64, [1000, 1048]),
                          (8, 1024, 64, None)):
        try:
            q, k, v, slope, cu = make(b, t, h, lens, True)
            kw = {} if cu is None else dict(cu_seqlens=cu.long())
            o = chunk_simple_gla(q, k, v, g_gamma=-slope.float(), scale=1.0, **kw)[0]
            o.sum().backward()
            n += 1
        except Exception as exc:
            print(f"  [warm fla: {type(exc).__name__}: {str(exc)[:100]}]", flush=True)
    return n


class Warm:
    """Compiles every candidate's kernels (and fla's) in a pool of processes while the main
    process does other GPU work (the checks); `wait()` before the sweep."""

    def __init__(self, tunings_backward, workers, check_jobs=()):
        self.t0 = time.time()
        self.pool = self.result = self.fla = self.checks = None
        if workers <= 1 or not tunings_backward:
            return
        jobs = [(tn.to_json(), bw) for tn, bw in tunings_backward]
        chunks = [c for c in (jobs[i::workers - 1] for i in range(workers - 1)) if c]
        self.n_jobs = len(jobs)
        try:
            self.pool = mp.get_context("spawn").Pool(workers)
            if check_jobs:  # GPU checks of the schedules first: they compile the most
                import check_lightning_gpu
                self.checks = self.pool.map_async(check_lightning_gpu.run_job, list(check_jobs),
                                                  chunksize=1)
            self.fla = self.pool.map_async(_warm_fla, [0])
            self.result = self.pool.map_async(_warm_worker, chunks)
        except Exception as exc:
            print(f"warm compile skipped: {type(exc).__name__}: {exc}", flush=True)
            self.pool = None

    def wait(self):
        if self.pool is None:
            return
        ok = False
        try:
            n = sum(self.result.get(timeout=300))
            nf = sum(self.fla.get(timeout=120))
            print(f"warm compile: {self.n_jobs} candidates, {n} runs, fla {nf} runs, "
                  f"{time.time() - self.t0:.0f} s since start", flush=True)
            ok = True
        except Exception as exc:
            print(f"warm compile failed: {type(exc).__name__}: {exc}", flush=True)
        finally:
            if ok:
                self.pool.close()
                self.pool.join()
            else:  # a hung or dead worker: do not wait for it
                self.pool.terminate()
            self.pool = None


def candidates(base: Tuning):
    rep = dataclasses.replace
    return ([(rep(base, fwd=t), False) for t in FWD] + [(rep(base, state=t), False) for t in STATE]
            + [(rep(base, dq=t, rev=t), True) for t in BWD]
            + [(rep(base, fused=t), True) for t in FUSED])


def start_warm(workers=None, check_jobs=()) -> Warm:
    workers = workers if workers is not None else max(1, min(12, (os.cpu_count() or 2) - 4))
    return Warm(candidates(triton_tune.tuning(torch.device("cuda"))), workers, check_jobs)


# ---- the sweep -----------------------------------------------------------------------------

class Sweep:
    def __init__(self, budget_s):
        self.t_end = time.time() + budget_s
        self.rows = []
        self.cut = False

    def left(self):
        return self.t_end - time.time()

    def measure(self, stage, row, tn, backward, label):
        if self.left() <= 0:
            self.cut = True
            return None
        rec = dict(stage=stage, case=row[0], label=label)
        try:
            rec["ms"] = time_row(row, tn, backward)
        except Exception as exc:
            rec["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
            torch.cuda.synchronize()
        torch.cuda.empty_cache()
        self.rows.append(rec)
        ms = rec.get("ms")
        print(f"  {stage:<6} {row[0]:<30} {label:<44} "
              f"{'%.4f ms' % ms if ms else rec.get('error', 'skipped')}", flush=True)
        return ms

    def pick(self, stage, base: Tuning, variants, rows, backward, keep=3):
        """variants: [(label, Tuning)]; the first is the reference. Times all on rows[0], the
        best `keep` on every row; returns the best by the geometric mean of time / reference."""
        first = {}
        for label, tn in variants:
            ms = self.measure(stage, rows[0], tn, backward, label)
            if ms:
                first[label] = ms
        if not first:
            return base
        ref_label = variants[0][0]
        if ref_label not in first:
            return base
        ranked = sorted(first, key=first.get)[:keep]
        if ref_label not in ranked:
            ranked.append(ref_label)
        times = {lab: [first[lab]] for lab in ranked}
        by_label = dict(variants)
        for row in rows[1:]:
            for lab in ranked:
                ms = self.measure(stage, row, by_label[lab], backward, lab)
                times[lab].append(ms)
        if self.left() > 0:  # not cut short: a candidate that failed on a row is out
            ranked = [lab for lab in ranked if lab == ref_label or all(times[lab])]
        # rows every ranked candidate was timed on (the budget may have cut the stage short)
        n = 0
        while n < len(rows) and all(times[lab][n] for lab in ranked):
            n += 1
        ref = times[ref_label] if ref_label in times else None
        if not n or ref is None:
            return base

        def score(lab):
            return math.exp(sum(math.log(a / b) for a, b in zip(times[lab][:n], ref[:n])) / n)
        best = min(ranked, key=score)
        print(f"  {stage}: best {best} ({score(best):.3f} x {ref_label} over {n} rows)",
              flush=True)
        return by_label.get(best, base)


def label(t: Tiles):
    return f"bt{t.block_t} bv{t.block_v} w{t.num_warps} s{t.num_stages}{' tma' if t.tma else ''}"


def sweep_prefill(sw: Sweep, base: Tuning) -> Tuning:
    rep = dataclasses.replace
    def first(cur, cands):  # the current choice first: it is the reference
        return [cur] + [t for t in cands if t != cur]
    tn = sw.pick("fwd", base, [(label(t), rep(base, fwd=t)) for t in first(base.fwd, FWD)],
                 FWD_ROWS[1:3] + [FWD_ROWS[0], FWD_ROWS[3]] + FWD_ROWS[5:], backward=False)
    split_fwd = [r for r in FWD_ROWS if r[3] == 8]
    tn = sw.pick("state", tn, [(label(t), rep(tn, state=t)) for t in first(tn.state, STATE)],
                 split_fwd,
                 backward=False, keep=2)
    tn = sw.pick("split", tn, [(f"pps {p}", rep(tn, programs_per_sm=p)) for p in
                               [tn.programs_per_sm] + [p for p in PPS if p != tn.programs_per_sm]],
                 SPLIT_ROWS, backward=True, keep=2)
    main_bwd = [BWD_ROWS[1], BWD_ROWS[0], BWD_ROWS[2]] + BWD_ROWS[5:] + SPLIT_ROWS
    tn = sw.pick("bwd", tn, [(label(t), rep(tn, dq=t, rev=t)) for t in first(tn.rev, BWD)],
                 main_bwd, backward=True, keep=2)
    fused = [("separate", rep(tn, fused=None))] if tn.fused is None else [("current", tn)]
    for t in FUSED:
        for p in (1.0, 2.0):
            fused.append((f"fused {label(t)} pps {p}", rep(tn, fused=t, fused_programs_per_sm=p)))
    tn = sw.pick("fused", tn, fused, main_bwd, backward=True, keep=2)
    tn = sw.pick("lpt", tn, [(f"lpt {x}", rep(tn, lpt=x)) for x in (tn.lpt, not tn.lpt)],
                 [BWD_ROWS[5]], backward=True)
    return tn


def sweep_decode(sw: Sweep, bw: float):
    """Best (block_v, num_warps, evict) per batch; the tuning's decode rows."""
    sys.path.insert(0, os.path.dirname(__file__))
    from lightning import decode_times
    rows = []
    for b in DECODE_BATCHES:
        best = None
        for bv, nw, ev in DECODE:
            if sw.left() <= 0:
                sw.cut = True
                break
            if b == 1 and bv > 64:
                continue
            t_ = decode_times(b, peers=False, block_v=bv, num_warps=nw, evict=bool(ev))["ours"]
            rate = 2 * b * 64 * D * E * 4 / (t_ * 1e-3) / 1e12 if t_ else None
            sw.rows.append(dict(stage="decode", case=f"decode B={b}", label=f"bv{bv} w{nw} ev{ev}",
                                ms=t_, tbps=rate, copy_fraction=rate * 1e12 / bw if rate else None))
            print(f"  decode B={b:<4} bv{bv:<4} w{nw} evict {ev}: "
                  f"{'%.4f ms %.2f TB/s (%.0f%% of copy)' % (t_, rate, 100 * rate * 1e12 / bw) if t_ else 'failed'}",
                  flush=True)
            if t_ and (best is None or t_ < best[0]):
                best = (t_, bv, nw, ev)
        if best:
            rows.append((0 if b == 1 else b * 64, best[1], best[2], best[3]))
    return tuple(rows)


def card_key() -> str:
    name = torch.cuda.get_device_name()
    for key in ("H200", "H100", "H800", "H20", "GH200", "A100", "B200"):
        if key in name:
            return key
    return name


def run(out_dir, budget_s, bw, warm: Warm | None = None, do_decode=True):
    """The whole sweep; returns the chosen Tuning (also loaded for this process)."""
    base = triton_tune.tuning(torch.device("cuda"))
    rep = dataclasses.replace
    if warm is not None:
        warm.wait()
    decode_s = min(40.0, budget_s / 4) if do_decode else 0.0
    sw = Sweep(budget_s - decode_s)
    t0 = time.time()
    tn = sweep_prefill(sw, base)
    if do_decode:
        sw.t_end = time.time() + decode_s
        tn = rep(tn, decode=sweep_decode(sw, bw) or base.decode)
    print(f"sweep: {len(sw.rows)} measurements in {time.time() - t0:.0f} s "
          f"({'stopped by the budget' if sw.cut else 'complete'})", flush=True)
    key = card_key()
    triton_tune.load({key: tn})
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "lightning_tuning.json"), "w") as f:
        json.dump({key: tn.to_json()}, f, indent=1)
    with open(os.path.join(out_dir, "lightning_sweep.json"), "w") as f:
        json.dump({"card": torch.cuda.get_device_name(), "rows": sw.rows,
                   "chosen": tn.to_json()}, f, indent=1)
    print(f"\nchosen tuning for {key}, measured by this run (the line for SHIPPED in "
          f"minimax01/ops/lightning/triton_tune.py):\n    {key!r}: {tn!r},\n", flush=True)
    return tn


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--budget-s", type=float, default=200)
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    from lightning import ceilings  # noqa: E402 (benchmarks/ on sys.path)
    bw, _ = ceilings()
    run(args.out, args.budget_s, bw, start_warm(args.workers))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
