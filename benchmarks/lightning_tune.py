"""Sweep the schedules of our Triton lightning kernels on this GPU and pick its tuning table.

    python benchmarks/lightning_tune.py --out DIR [--budget-s 150] [--checks DIR/check_results.json]

(`benchmarks/lightning.py --tune` runs this inside the full benchmark.) Every candidate is a
schedule of the same arithmetic (tests/test_lightning_tuning.py), so only time decides. Only
candidates whose GPU check passed in the same run are measured (`allowed`, from the results
of benchmarks/check_lightning_gpu.py): a broken option can neither be chosen nor crash the
sweep. Stages, each on the issue's rows (bf16, D = E = 128), best-first, stopped by the budget:

  fwd    forward tiles (block_t, block_v, warps, stages, TMA) on fwd H64 T16K, the best three on
         every forward row; chosen by the geometric mean of time / default over the rows
  state  tiles of the local-state pass, on the split rows (H8)
  split  programs per SM of a split sequence (H8 T64K/256K forward+backward)
  bwd    dq / reverse-scan tiles on fwd+bwd H64 T16K, the best two on every backward row
  fused  the fused dk+dv pass (all of E per program) against the separate passes
  lpt    longest-first order of packed documents
  decode value slice / warps / evict-first per batch (1, 16, 64, 256) under CUDA-graph replay

The sweep runs in a child process that saves its state (every measurement, every finished
stage, the measurement in flight) after each step; if the child dies (an illegal memory access
poisons its CUDA context), the parent marks the candidate in flight as bad and starts a new
child that resumes where the last one stopped, until the budget is spent. `warm_jobs` gives
compile-only processes (no kernel is launched) that fill Triton's disk cache with every
candidate's kernels while the checks run. Writes DIR/lightning_tuning.json ({card: Tuning
fields}, load it with MINIMAX01_LIGHTNING_TUNING or `triton_tune.load`) and
DIR/lightning_sweep.json (every measurement), and prints the Python line for SHIPPED."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from minimax01.ops import lightning_attn  # noqa: E402
from minimax01.ops.lightning import lightning_slopes, triton_plan, triton_tune  # noqa: E402
from minimax01.ops.lightning.triton_tune import Tiles, Tuning  # noqa: E402

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


def label(t: Tiles):
    return f"bt{t.block_t} bv{t.block_v} w{t.num_warps} s{t.num_stages}{' tma' if t.tma else ''}"


def card_key() -> str:
    name = torch.cuda.get_device_name()
    for key in ("H200", "H100", "H800", "H20", "GH200", "A100", "B200"):
        if key in name:
            return key
    return name


# ---- what the checks proved ------------------------------------------------------------------

def allowed(results: dict | None) -> dict:
    """The candidates the GPU checks of this run passed ({case: result} of
    check_lightning_gpu.run_isolated; None: nothing was checked, so only the default). The
    default tiles need every default-schedule case; a tile set its own case."""
    import check_lightning_gpu as chk

    def ok(name):
        return results is not None and chk.passed(results, name)
    default_ok = all(ok(n) for n in chk.DEFAULT_CASES)
    base = triton_tune.DEFAULT.fwd

    def tiles_ok(t):
        return default_ok and (t == base or ok(chk.tiles_case(t)))
    return dict(default=default_ok,
                fwd=[t for t in FWD if tiles_ok(t)], state=[t for t in STATE if tiles_ok(t)],
                bwd=[t for t in BWD if tiles_ok(t)],
                fused=[t for t in FUSED if default_ok and ok(chk.fused_case(t))],
                lpt=default_ok and ok(chk.LPT_CASE), decode=ok(chk.DECODE_CASE))


def allowed_to_json(a: dict) -> dict:
    return {k: ([dataclasses.asdict(t) for t in v] if isinstance(v, list) else v)
            for k, v in a.items()}


def allowed_from_json(d: dict) -> dict:
    return {k: ([Tiles(**t) for t in v] if isinstance(v, list) else v) for k, v in d.items()}


# ---- compile-only warm-up ---------------------------------------------------------------------

WARM_PROBLEMS = ((1, 1024, 64, None, {}), (1, 4096, 8, None, dict(seg_len=1024)),
                 (1, 2048, 64, [1000, 1048], {}), (1, 4096, 8, [3000, 1096], dict(seg_len=1024)))


def candidates(base: Tuning):
    rep = dataclasses.replace
    return ([(base, False), (base, True)] + [(rep(base, fwd=t), False) for t in FWD]
            + [(rep(base, state=t), False) for t in STATE]
            + [(rep(base, dq=t, rev=t), True) for t in BWD]
            + [(rep(base, fused=t), True) for t in FUSED] + [(rep(base, lpt=True), True)])


def _compile_only():
    """Make every Triton launch of this process compile and return without running: the warm
    processes fill the disk cache and can never fault (the host path reads nothing back)."""
    from triton.runtime.jit import JITFunction
    orig = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        return orig(self, *args, grid=grid, warmup=True, **kwargs)
    JITFunction.run = run


def _warm_compile(path):
    with open(path) as f:
        jobs = json.load(f)
    _compile_only()
    from minimax01.ops.lightning.triton_decode import triton_lightning_decode
    n = 0
    for item in jobs:
        if item == "decode":
            for b in (1, 16):
                q, k = (torch.zeros(b, 64, D, device="cuda", dtype=DT) for _ in range(2))
                v, s = torch.zeros(b, 64, E, device="cuda", dtype=DT), torch.zeros(
                    b, 64, D, E, device="cuda")
                for bv, nw, ev in DECODE:
                    triton_lightning_decode(q, k, v, s, torch.ones(64, device="cuda"), None,
                                            block_v=bv, num_warps=nw, evict=bool(ev))
                    n += 1
            continue
        tn_json, backward = item
        tn = Tuning.from_json(tn_json)
        for b, t, h, lens, extra in WARM_PROBLEMS:
            try:
                q, k, v, slope, cu = make(b, t, h, lens, backward)
                with triton_plan.override(**tuning_override(tn), **extra):
                    op_fn(q, k, v, slope, cu, backward)()
                n += 1
            except Exception as exc:  # a compile error: the check of that candidate says more
                print(f"  [warm compile: {type(exc).__name__}: {str(exc)[:120]}]", flush=True)
    print(f"warm compile: {n} problems", flush=True)


def warm_jobs(n_procs: int, work_dir: str, timeout: float):
    """lightning_isolate.Jobs that compile (never run) every candidate's kernels."""
    from lightning_isolate import Job, python_argv
    items = [[tn.to_json(), bw] for tn, bw in candidates(triton_tune.DEFAULT)] + ["decode"]
    jobs = []
    for i in range(n_procs):
        chunk = items[i::n_procs]
        if not chunk:
            continue
        path = os.path.join(work_dir, f"warm{i}.json")
        with open(path, "w") as f:
            json.dump(chunk, f)
        jobs.append(Job(f"warm{i}", python_argv(os.path.abspath(__file__), "--warm-compile",
                                                path), timeout))
    return jobs


# ---- the sweep (child process) -------------------------------------------------------------------

def _context_ok() -> bool:
    try:
        torch.cuda.synchronize()
        return True
    except Exception:
        return False


class Sweep:
    """Measurements with a persistent state: a restarted child skips what is done."""

    def __init__(self, state_path, deadline):
        self.path = state_path
        self.t_end = deadline
        self.cut = False
        self.state = dict(rows=[], done={}, bad=[], in_flight=None)
        if os.path.exists(state_path):
            with open(state_path) as f:
                self.state.update(json.load(f))
        self.memo = {r["key"]: r for r in self.state["rows"]}

    def save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state, f, indent=1)
        os.replace(tmp, self.path)

    def left(self):
        return self.t_end - time.time()

    def measure(self, stage, case, label_, fn):
        """ms of fn() (None: failed, skipped, or out of time); remembered across restarts."""
        key = f"{stage}|{case}|{label_}"
        if key in self.memo:
            return self.memo[key].get("ms")
        if f"{stage}|{label_}" in self.state["bad"]:
            return None
        if self.left() <= 0:
            self.cut = True
            return None
        self.state["in_flight"] = dict(stage=stage, case=case, label=label_)
        self.save()
        rec = dict(key=key, stage=stage, case=case, label=label_)
        try:
            rec.update(fn())
        except Exception as exc:
            rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            if not _context_ok():  # sticky CUDA error: this process is done, the parent resumes
                self.state["bad"].append(f"{stage}|{label_}")
                self.state["rows"].append(rec)
                self.save()
                print(f"  {stage:<6} {case:<30} {label_:<44} CRASH {rec['error']}", flush=True)
                sys.exit(3)
        torch.cuda.empty_cache()
        self.state["in_flight"] = None
        self.state["rows"].append(rec)
        self.memo[key] = rec
        self.save()
        ms = rec.get("ms")
        print(f"  {stage:<6} {case:<30} {label_:<44} "
              f"{'%.4f ms' % ms if ms else rec.get('error', 'failed')}", flush=True)
        return ms

    def stage(self, name, fn, tn: Tuning) -> Tuning:
        """Run stage `name` (tn -> tuning) once; a restarted child takes its recorded result."""
        if name in self.state["done"]:
            return Tuning.from_json(self.state["done"][name])
        tn = fn(tn)
        self.state["done"][name] = tn.to_json()
        self.state["tuning"] = tn.to_json()
        self.save()
        return tn

    def pick(self, stage, base: Tuning, variants, rows, backward, keep=3):
        """variants: [(label, Tuning)]; the first is the reference. Times all on rows[0], the
        best `keep` on every row; returns the best by the geometric mean of time / reference."""
        def timed(row, lab, tn):
            return self.measure(stage, row[0], lab, lambda: dict(ms=time_row(row, tn, backward)))
        first = {}
        for lab, tn in variants:
            ms = timed(rows[0], lab, tn)
            if ms:
                first[lab] = ms
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
                times[lab].append(timed(row, lab, by_label[lab]))
        if self.left() > 0:  # not cut short: a candidate that failed on a row is out
            ranked = [lab for lab in ranked if lab == ref_label or all(times[lab])]
        # rows every ranked candidate was timed on (the budget may have cut the stage short)
        n = 0
        while n < len(rows) and all(times[lab][n] for lab in ranked):
            n += 1
        if not n:
            return base
        ref = times[ref_label]

        def score(lab):
            return math.exp(sum(math.log(a / b) for a, b in zip(times[lab][:n], ref[:n])) / n)
        best = min(ranked, key=score)
        print(f"  {stage}: best {best} ({score(best):.3f} x {ref_label} over {n} rows)",
              flush=True)
        return by_label.get(best, base)


def sweep_prefill(sw: Sweep, base: Tuning, allow: dict) -> Tuning:
    rep = dataclasses.replace

    def first(cur, cands):  # the current choice first: it is the reference
        return [cur] + [t for t in cands if t != cur]
    split_fwd = [r for r in FWD_ROWS if r[3] == 8]
    main_bwd = [BWD_ROWS[1], BWD_ROWS[0], BWD_ROWS[2]] + BWD_ROWS[5:] + SPLIT_ROWS

    def fused_variants(tn):
        out = [("separate", rep(tn, fused=None))] if tn.fused is None else [("current", tn)]
        for t in allow["fused"]:
            for p in (1.0, 2.0):
                out.append((f"fused {label(t)} pps {p}", rep(tn, fused=t,
                                                             fused_programs_per_sm=p)))
        return out
    stages = [
        ("fwd", lambda tn: sw.pick("fwd", tn, [(label(t), rep(tn, fwd=t))
                                               for t in first(tn.fwd, allow["fwd"])],
                                   FWD_ROWS[1:3] + [FWD_ROWS[0], FWD_ROWS[3]] + FWD_ROWS[5:],
                                   backward=False)),
        ("state", lambda tn: sw.pick("state", tn, [(label(t), rep(tn, state=t))
                                                   for t in first(tn.state, allow["state"])],
                                     split_fwd, backward=False, keep=2)),
        ("split", lambda tn: sw.pick("split", tn, [(f"pps {p}", rep(tn, programs_per_sm=p))
                                                   for p in [tn.programs_per_sm] + [
                                                       p for p in PPS if p != tn.programs_per_sm]],
                                     SPLIT_ROWS, backward=True, keep=2)),
        ("bwd", lambda tn: sw.pick("bwd", tn, [(label(t), rep(tn, dq=t, rev=t))
                                               for t in first(tn.rev, allow["bwd"])],
                                   main_bwd, backward=True, keep=2)),
        ("fused", lambda tn: sw.pick("fused", tn, fused_variants(tn), main_bwd, backward=True,
                                     keep=2) if allow["fused"] else tn),
        ("lpt", lambda tn: sw.pick("lpt", tn, [(f"lpt {x}", rep(tn, lpt=x))
                                               for x in (tn.lpt, not tn.lpt)],
                                   [BWD_ROWS[5]], backward=True) if allow["lpt"] else tn),
    ]
    tn = base
    for name, fn in stages:
        tn = sw.stage(name, fn, tn)
    return tn


def sweep_decode(sw: Sweep, bw: float, tn: Tuning) -> Tuning:
    """Best (block_v, num_warps, evict) per batch: the tuning's decode rows."""
    from lightning import decode_times
    rows = []
    for b in DECODE_BATCHES:
        best = None
        for bv, nw, ev in DECODE:
            if b == 1 and bv > 64:
                continue

            def run(b=b, bv=bv, nw=nw, ev=ev):
                t_ = decode_times(b, peers=False, block_v=bv, num_warps=nw, evict=bool(ev))["ours"]
                if not isinstance(t_, float):
                    raise RuntimeError("decode graph failed")
                rate = 2 * b * 64 * D * E * 4 / (t_ * 1e-3) / 1e12
                return dict(ms=t_, tbps=rate, copy_fraction=rate * 1e12 / bw)
            t_ = sw.measure("decode", f"decode B={b}", f"bv{bv} w{nw} ev{ev}", run)
            if t_ and (best is None or t_ < best[0]):
                best = (t_, bv, nw, ev)
        if best:
            rows.append((0 if b == 1 else b * 64, best[1], best[2], best[3]))
    return dataclasses.replace(tn, decode=tuple(rows) or tn.decode)


def child_main(state_path, allowed_path, deadline, decode_s, bw):
    with open(allowed_path) as f:
        allow = allowed_from_json(json.load(f))
    base = triton_tune.DEFAULT
    sw = Sweep(state_path, deadline - decode_s)
    t0 = time.time()
    tn = sweep_prefill(sw, base, allow)
    if allow["decode"] and decode_s > 0:
        sw.t_end = deadline
        tn = sw.stage("decode", lambda t: sweep_decode(sw, bw, t), tn)
    sw.state["chosen"] = tn.to_json()
    sw.state["cut"] = sw.cut or sw.state.get("cut", False)
    sw.save()
    print(f"sweep child: {len(sw.state['rows'])} measurements, {time.time() - t0:.0f} s "
          f"({'stopped by the budget' if sw.cut else 'complete'})", flush=True)


# ---- the parent ---------------------------------------------------------------------------------

def run(out_dir, budget_s, bw, allow: dict, attempts=4, log=print,
        work_dir=None) -> Tuning | None:
    """The whole sweep in child processes (resumed after a crash); returns the chosen Tuning
    (None if nothing could be measured) and writes the JSON files. The default schedule is the
    reference of every stage: without it passing its checks nothing is swept."""
    os.makedirs(out_dir, exist_ok=True)
    if not allow.get("default"):
        log("sweep skipped: the default schedule did not pass its checks")
        return None
    import tempfile
    work_dir = work_dir or tempfile.mkdtemp(prefix="lightning_sweep_")
    state_path = os.path.join(work_dir, "sweep_state.json")
    allowed_path = os.path.join(work_dir, "sweep_allowed.json")
    with open(allowed_path, "w") as f:
        json.dump(allowed_to_json(allow), f)
    if os.path.exists(state_path):
        os.remove(state_path)
    log("sweep candidates (passed their checks): " + "; ".join(
        f"{k} {len(v)}" if isinstance(v, list) else f"{k} {v}" for k, v in allow.items()))
    deadline = time.time() + budget_s
    decode_s = min(40.0, budget_s / 4) if allow["decode"] else 0.0
    crashes = []
    for attempt in range(attempts):
        if deadline - time.time() < 5:
            break
        argv = [sys.executable, os.path.abspath(__file__), "--child", "--state", state_path,
                "--allowed", allowed_path, "--deadline", str(deadline), "--decode-s",
                str(decode_s), "--bw", str(bw)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        try:  # the child's lines go straight to our stdout (a killed run keeps them)
            rc = subprocess.run(argv, env=env, timeout=deadline - time.time() + 60).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        if rc == 0:
            break
        state = json.load(open(state_path)) if os.path.exists(state_path) else {}
        inflight = state.get("in_flight")
        crashes.append(dict(rc=rc, in_flight=inflight))
        log(f"sweep child ended rc={rc}; in flight: {inflight}")
        if not inflight:
            break  # not a measurement's fault: do not loop
        key = f"{inflight['stage']}|{inflight['label']}"
        if key not in state.get("bad", []):
            state.setdefault("bad", []).append(key)
        state["in_flight"] = None
        with open(state_path, "w") as f:
            json.dump(state, f, indent=1)
    state = json.load(open(state_path)) if os.path.exists(state_path) else {}
    chosen = state.get("chosen") or state.get("tuning")
    if chosen is None:
        return None
    tn = Tuning.from_json(chosen)
    key = card_key()
    with open(os.path.join(out_dir, "lightning_tuning.json"), "w") as f:
        json.dump({key: tn.to_json()}, f, indent=1)
    with open(os.path.join(out_dir, "lightning_sweep.json"), "w") as f:
        json.dump({"card": torch.cuda.get_device_name(), "rows": state.get("rows", []),
                   "bad": state.get("bad", []), "crashes": crashes,
                   "complete": "chosen" in state, "chosen": tn.to_json()}, f, indent=1)
    how = ("complete" if "chosen" in state else
           f"INCOMPLETE: stages {list(state.get('done', {}))}")
    log(f"\nchosen tuning for {key}, measured by this run ({how}; the line for SHIPPED in "
        f"minimax01/ops/lightning/triton_tune.py):\n    {key!r}: {tn!r},\n")
    return tn


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--budget-s", type=float, default=150)
    ap.add_argument("--checks", help="check_results.json of check_lightning_gpu.py --out "
                    "(default: run the checks first)")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--warm-compile")
    ap.add_argument("--state")
    ap.add_argument("--allowed")
    ap.add_argument("--deadline", type=float)
    ap.add_argument("--decode-s", type=float, default=0)
    ap.add_argument("--bw", type=float, default=3e12)
    args = ap.parse_args()
    if args.warm_compile:
        _warm_compile(args.warm_compile)
        return
    if args.child:
        child_main(args.state, args.allowed, args.deadline, args.decode_s, args.bw)
        return
    import check_lightning_gpu as chk
    if args.checks:
        with open(args.checks) as f:
            results = json.load(f)
    else:
        results = chk.run_isolated()
    from lightning import ceilings
    bw, _ = ceilings()
    run(args.out, args.budget_s, bw, allowed(results))


if __name__ == "__main__":
    main()
