"""The tile sweep of the 8-bit grouped matmul (`quant_slice.py --sweep`): every config of
minimax01/ops/quant/triton_w8.py's SMALL_SPACE (decode) and LARGE_SPACE (prefill) at the slice's
expert shapes (w13 = gate_up [E, 2I, H], w2 = down [E, H, I]; and the lightning projections, one
dense group) and the row counts of decode batch 1 / 16 / 64 (distinct tokens, random top-2) and of
an 8K prefill, each checked against the plain-PyTorch twin before it is timed, with the bandwidth
floor of every case (the 8-bit bytes of the experts it touches over the measured copy rate).

Configs run in worker processes (`python benchmarks/quant_sweep.py SPEC.json`, a dozen configs
each): a config that faults (an illegal address poisons its CUDA context) or hangs costs only
itself, the rest of its batch goes to a fresh worker. A first worker times the non-Triton paths:
bf16 torch._grouped_mm / F.linear, and dequantise-to-bf16 + grouped matmul (the "dequant"
backend), also at 32..1024 rows per expert against the tuned W8A16 kernel: the measured crossover
for DEQUANT_MIN_ROWS. The winners are printed as the SHIPPED entry of triton_w8.py."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import lightning_isolate as iso  # noqa: E402
import quant_slice as qs  # noqa: E402

from minimax01.ops.moe import default_matmul, grouped_mm  # noqa: E402
from minimax01.ops.quant import grouped as gq  # noqa: E402
from minimax01.ops.quant import triton_w8 as tw  # noqa: E402
from minimax01.ops.quant.schemes import dequantize  # noqa: E402
from minimax01.quant.modules import _quantize_stacked  # noqa: E402

TOL = 2 ** -7          # bf16 output against the twin (tests/test_quant_ops.py's bound)
CROSSOVER_ROWS = (32, 64, 128, 256, 512, 1024)
DONE, START_TAG, RESULT_TAG = "SWEEP-DONE", "SWEEP-START ", "SWEEP-RESULT "


def ordered(space: list, first: list) -> list:
    """The run-time shortlist first (so a cut-short sweep still covers it), then the rest."""
    return [c for c in first if c in space] + [c for c in space if c not in first]


def space(limit: int | None = None) -> tuple[list, list]:
    small = ordered(tw.SMALL_SPACE, tw._GEMV[1] + tw._GEMV[4] + tw._DECODE)
    large = ordered(tw.LARGE_SPACE, tw._PREFILL)
    return (small[:limit], large[:limit]) if limit else (small, large)


def matrices(cfg, dense: bool) -> list[tuple]:
    """(name, N, K, groups): the expert matrices, then (dense) the lightning projections."""
    e, h, i = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    out = [("w13", 2 * i, h, e), ("w2", h, i, e)]
    if dense:
        w = cfg.num_attention_heads * cfg.head_dim
        out += [("qkv", 3 * w, h, 1), ("gate", w, h, 1), ("out", h, w, 1)]
    return out


def cases(spec) -> list[tuple]:
    """(name, kind, tokens): decode at each batch, then the prefill."""
    return [(f"decode b={b}", "decode", b) for b in spec["batches"]] + \
        [(f"prefill {spec['prefill']}", "prefill", spec["prefill"])]


# ------------------------------------------------------------------------------ inside a worker
class Bench:
    """Weights, inputs and twin outputs of every (matrix, case), built on first use."""

    def __init__(self, spec):
        self.spec, self.dev = spec, torch.device(spec["device"])
        self.cfg = qs.slice_config(spec["tiny"])
        self.fmt = spec["fmt"]
        self.bw = qs.copy_rate(self.dev) if self.dev.type == "cuda" else 1e11
        self._w, self._x, self._ref = {}, {}, {}

    def weights(self, mat):
        name, n, k, groups = mat
        if name not in self._w:
            g = torch.Generator(device=self.dev).manual_seed(n * 31 + k)
            w = (torch.randn(groups, n, k, device=self.dev, generator=g) * k ** -0.5)
            w = w.to(torch.bfloat16)
            q, s = _quantize_stacked(w, self.fmt)
            del w
            if groups == 1:
                q, s = q[0], s[0]
            self._w[name] = (q, s)
        return self._w[name]

    def inputs(self, mat, case):
        """(x, counts or None, offs or None, touched groups) of a case."""
        key = (mat[0], case[0])
        if key not in self._x:
            name, n, k, groups = mat
            tokens = case[2]
            if groups == 1:
                counts, m, touched = None, tokens, 1
            else:
                counts = qs.routed_counts(tokens, groups, self.cfg.num_experts_per_tok, self.dev)
                m, touched = int(counts.sum()), int((counts > 0).sum())
            g = torch.Generator(device=self.dev).manual_seed(tokens)
            x = torch.randn(m, k, device=self.dev, generator=g).to(torch.bfloat16)
            offs = None if counts is None else gq._offsets(counts, self.dev)
            self._x[key] = (x, counts, offs, touched)
        return self._x[key]

    def run(self, mat, case, config=None, backend=None):
        q, s = self.weights(mat)
        x, counts, offs, _ = self.inputs(mat, case)
        if backend is not None:
            if counts is None:
                return gq.linear_q(x, q, s, backend=backend)
            return gq.grouped_mm_q(x, q, s, counts, backend=backend)
        return tw.grouped_w8(x, q, s, offs, config=config)

    def ref(self, mat, case):
        key = (mat[0], case[0])
        if key not in self._ref:
            self._ref[key] = self.run(mat, case, backend="torch")
        return self._ref[key]

    def floor_ms(self, mat, case) -> float:
        """8-bit weight bytes (and scales) of the groups the case touches, at the copy rate."""
        _, n, k, _ = mat
        return self.inputs(mat, case)[3] * n * (k + 4) / self.bw * 1e3

    def timed_ms(self, fn) -> float:
        reps = self.spec["reps"]
        return qs.timed(fn, self.dev, reps=reps, warm=2) * 1e3


def _healthy(dev) -> bool:
    """False once the CUDA context is poisoned (an illegal address is sticky)."""
    if dev.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(dev)
        return torch.ones(1, device=dev).add_(1).item() == 2.0
    except Exception:  # noqa: BLE001
        return False


def run_config(bench, cfg) -> dict:
    """Check, then time, one config on every matching case (small configs: decode; large:
    prefill)."""
    res = {"config": list(cfg), "cases": []}
    want = "decode" if tw.is_decode_config(cfg) else "prefill"
    for mat in matrices(bench.cfg, bench.spec["dense"]):
        for case in cases(bench.spec):
            if case[1] != want:
                continue
            row = {"matrix": mat[0], "case": case[0]}
            err = qs.rel(bench.run(mat, case, cfg).float(), bench.ref(mat, case).float())
            if not err < TOL:
                row["wrong"] = f"rel err {err:.2e}"
            else:
                row["ms"] = bench.timed_ms(lambda: bench.run(mat, case, cfg))
                row["floor_ms"] = bench.floor_ms(mat, case)
                row["rel_err"] = err
            res["cases"].append(row)
    return res


def run_paths(bench) -> dict:
    """bf16 and dequant-path times per case, and the dequant / W8A16 crossover."""
    out = {"paths": [], "crossover": []}
    for mat in matrices(bench.cfg, bench.spec["dense"]):
        q, s = bench.weights(mat)
        if bench.dev.type == "cuda":  # no fp32 copy of 3.6 GB of int8 weights
            w16 = tw.dequantize_w8(q, s, torch.empty(q.shape, dtype=torch.bfloat16,
                                                     device=bench.dev))
        else:
            w16 = dequantize(q, s, torch.bfloat16)
        for case in cases(bench.spec):
            x, counts, _, _ = bench.inputs(mat, case)
            row = {"matrix": mat[0], "case": case[0], "floor_ms": bench.floor_ms(mat, case)}
            if counts is None:
                row["bf16_ms"] = bench.timed_ms(lambda: x @ w16.t())
            else:
                impl = default_matmul(x)
                row["bf16_ms"] = bench.timed_ms(lambda: grouped_mm(x, w16, counts, impl))
            err = qs.rel(bench.run(mat, case, backend="dequant").float(),
                         bench.ref(mat, case).float())
            row["dequant_rel_err"] = err
            if err < TOL:
                row["dequant_ms"] = bench.timed_ms(lambda: bench.run(mat, case, backend="dequant"))
            out["paths"].append(row)
        if mat[3] > 1:  # rows per expert r: every expert r rows
            for r in bench.spec["crossover"]:
                counts = torch.full((mat[3],), r, device=bench.dev)
                x = torch.randn(int(counts.sum()), mat[2], device=bench.dev).to(torch.bfloat16)
                row = {"matrix": mat[0], "rows_per_expert": r}
                for name in ("triton", "dequant"):
                    row[f"{name}_ms"] = bench.timed_ms(
                        lambda name=name: gq.grouped_mm_q(x, q, s, counts, backend=name))
                impl = default_matmul(x)
                row["bf16_ms"] = bench.timed_ms(lambda: grouped_mm(x, w16, counts, impl))
                out["crossover"].append(row)
        w16 = None  # freed before the next matrix's copy
    return out


def worker(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    bench = Bench(spec)
    if spec.get("paths"):
        print(START_TAG + "paths", flush=True)
        print(RESULT_TAG + json.dumps(run_paths(bench)), flush=True)
    for cfg in spec.get("configs", []):
        cfg = tuple(cfg)
        if time.time() > spec["deadline"]:
            print(RESULT_TAG + json.dumps({"config": list(cfg), "skipped": "time budget"}),
                  flush=True)
            continue
        print(START_TAG + json.dumps(list(cfg)), flush=True)
        if spec.get("fault") and list(cfg) == spec["fault"]:
            os.abort()  # fault injection (tests): a crash inside this config
        try:
            res = run_config(bench, cfg)
        except Exception as ex:  # noqa: BLE001 - a compile error, out of resources, a fault
            res = {"config": list(cfg), "error": f"{type(ex).__name__}: {str(ex)[:300]}"}
            if not _healthy(bench.dev):
                res["error"] += " (CUDA context lost)"
                print(RESULT_TAG + json.dumps(res), flush=True)
                return 3
        print(RESULT_TAG + json.dumps(res), flush=True)
    print(DONE, flush=True)
    return 0


# ------------------------------------------------------------------------------ the parent
def parse(out: str) -> tuple[list, object]:
    """(results, the label of the job in flight when it ended, or None)."""
    results, current = [], None
    for line in out.splitlines():
        if line.startswith(START_TAG):
            current = line[len(START_TAG):]
        elif line.startswith(RESULT_TAG):
            results.append(json.loads(line[len(RESULT_TAG):]))
            current = None
    return results, current


def sweep(args, log) -> dict:
    """Run the sweep (workers), return {"configs": [...], "paths": {...}, "winners": {...}}."""
    t0 = time.time()
    deadline = t0 + args.sweep_budget
    tiny = args.tiny
    small, large = space(args.sweep_limit)
    base = {"device": args.device, "tiny": tiny, "fmt": "int8", "batches": args.batches,
            "prefill": args.prefill, "reps": args.reps, "dense": not args.sweep_no_dense,
            "crossover": list(CROSSOVER_ROWS if not tiny else (8,)), "deadline": deadline,
            "fault": args.sweep_fault}
    tmp = tempfile.mkdtemp(prefix="quant_sweep_")
    script = os.path.abspath(__file__)
    per_cfg = 60.0 if args.device == "cpu" else 20.0
    counter = [0]

    def job(configs, paths=False):
        counter[0] += 1
        path = os.path.join(tmp, f"spec{counter[0]}.json")
        with open(path, "w") as f:
            json.dump(dict(base, configs=[list(c) for c in configs], paths=paths), f)
        timeout = 90.0 + per_cfg * (len(configs) + (8 if paths else 0))
        return iso.Job(f"sweep{counter[0]}", [sys.executable, script, path], timeout,
                       env={"PYTHONPATH": os.path.join(os.path.dirname(script), "..")})

    chunk = 12  # decode shortlist first, then prefill, then the rest of the decode space
    parts = [small[i:i + chunk] for i in range(0, len(small), chunk)]
    jobs = [job([], paths=True)] + [job(p) for p in parts[:1]] + [job(large)] + \
        [job(p) for p in parts[1:]]
    found, paths = [], {}

    def on_done(j, queue):
        results, current = parse(j.out)
        with open(j.argv[-1]) as f:
            configs = [tuple(c) for c in json.load(f)["configs"]]
        for r in results:
            if "paths" in r:
                paths.update(r)
            else:
                found.append(r)
        seen = {tuple(r["config"]) for r in results if "config" in r}
        tail = " | ".join(j.out.strip().splitlines()[-3:])[-400:]
        why = "timed out" if j.timed_out else f"crashed (rc {j.rc})"
        if current == "paths":
            log(f"sweep: the bf16/dequant paths job {why}: {tail}")
        elif current is not None:
            found.append({"config": json.loads(current), "error": f"{why}: {tail}"})
            seen.add(tuple(json.loads(current)))
            log(f"sweep: config {tuple(json.loads(current))} {why}")
        rest = [c for c in configs if c not in seen]
        if rest and (current is not None or j.rc == 3):  # died in a config: the rest goes on
            queue.append(job(rest))
        elif rest:  # never ran (time budget) or the worker failed before its first config
            why = "time budget" if j.rc is None else f"worker failed (rc {j.rc}): {tail}"
            found.extend({"config": list(c), "skipped": why} for c in rest)
        done = sum(1 for r in found if "config" in r)
        log(f"sweep: {j.name} rc={j.rc} in {j.seconds:.0f}s; {done}/{len(small) + len(large)} "
            f"configs done")

    iso.run_jobs(jobs, parallel=1, on_done=on_done, deadline=deadline)
    res = {"configs": found, "paths": paths, "seconds": time.time() - t0}
    res["winners"], res["table"] = winners(args, found)
    res["dequant_min_rows"] = crossover(paths.get("crossover", []))
    return res


def case_key(args, mat, case_name) -> tuple:
    """triton_w8's SHIPPED key of one (matrix, case): (format, N, K, groups, rows bucket)."""
    cfg = qs.slice_config(args.tiny)
    name, n, k, groups = mat
    tokens = args.prefill if case_name.startswith("prefill") else int(case_name.split("=")[1])
    m = tokens if groups == 1 else tokens * cfg.num_experts_per_tok
    return ("int8", n, k, groups, tw.rows_bucket(m))


def winners(args, found) -> tuple[list, list]:
    """The fastest correct config per (matrix, case) as SHIPPED entries, and the table rows."""
    cfg = qs.slice_config(args.tiny)
    mats = {m[0]: m for m in matrices(cfg, not args.sweep_no_dense)}
    by = {}
    for r in found:
        for c in r.get("cases", []):
            if "ms" in c:
                by.setdefault((c["matrix"], c["case"]), []).append((c["ms"], tuple(r["config"]), c))
    best, table = {}, []
    for (mat, case), runs in by.items():
        runs.sort(key=lambda t: t[0])
        ms, config, c = runs[0]
        key = case_key(args, mats[mat], case)  # tiny widths: two matrices may share a key
        if key not in best or best[key]["ms"] > ms:
            best[key] = {"key": list(key), "config": list(config), "matrix": mat, "case": case,
                         "ms": ms, "floor_ms": c["floor_ms"]}
        table.append({"matrix": mat, "case": case, "best": list(config), "ms": ms,
                      "floor_ms": c["floor_ms"], "of_floor": c["floor_ms"] / ms,
                      "runners_up": [[list(cf), t] for t, cf, _ in runs[1:3]]})
    return list(best.values()), table


def crossover(rows) -> int | None:
    """The smallest measured rows per expert from which the dequant path is at least as fast as
    the W8A16 kernel for every expert matrix at that and every larger measured count."""
    if not rows:
        return None
    mats = sorted({r["matrix"] for r in rows})
    counts = sorted({r["rows_per_expert"] for r in rows})
    wins = {r_: all(r["dequant_ms"] <= r["triton_ms"] for r in rows if r["rows_per_expert"] == r_)
            for r_ in counts}
    ok = [r_ for r_ in counts if all(wins[c] for c in counts if c >= r_)]
    return ok[0] if ok and len(mats) else None


def report(res, info, log) -> str:
    """The human-readable table, the paste-able SHIPPED entry and the crossover line."""
    lines = ["", f"== 8-bit grouped matmul sweep ({res['seconds']:.0f}s): best config per case "
             "(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, warps, stages), ms, floor, % of floor, "
             "bf16 and dequant paths =="]
    paths = {(p["matrix"], p["case"]): p for p in res["paths"].get("paths", [])}
    for t in res["table"]:
        p = paths.get((t["matrix"], t["case"]), {})
        lines.append(f"  {t['matrix']:5} {t['case']:14} {str(tuple(t['best'])):26} "
                     f"{t['ms']:8.4f} ms  floor {t['floor_ms']:7.4f} ({t['of_floor']:4.0%})  "
                     f"bf16 {p.get('bf16_ms', float('nan')):8.4f}  dequant "
                     f"{p.get('dequant_ms', float('nan')):8.4f}")
    for p in res["paths"].get("paths", []):
        if (p["matrix"], p["case"]) not in {(t["matrix"], t["case"]) for t in res["table"]}:
            lines.append(f"  {p['matrix']:5} {p['case']:14} {'(no correct config)':26} "
                         f"bf16 {p.get('bf16_ms', float('nan')):8.4f}  dequant "
                         f"{p.get('dequant_ms', float('nan')):8.4f}")
    bad = [r for r in res["configs"] if "error" in r or "wrong" in r]
    for r in bad:
        lines.append(f"  excluded {tuple(r['config'])}: {r.get('error') or r.get('wrong')}")
    wrong_cases = [(tuple(r["config"]), c) for r in res["configs"] for c in r.get("cases", [])
                   if "wrong" in c]
    for cfg, c in wrong_cases:
        lines.append(f"  wrong {cfg} on {c['matrix']} {c['case']}: {c['wrong']}")
    lines.append("== W8A16 kernel vs dequant + bf16 grouped matmul, by rows per expert (ms) ==")
    for r in res["paths"].get("crossover", []):
        lines.append(f"  {r['matrix']:4} r={r['rows_per_expert']:5}: triton {r['triton_ms']:8.3f}  "
                     f"dequant {r['dequant_ms']:8.3f}  bf16 {r['bf16_ms']:8.3f}")
    gpu = info.get("gpu", info["device"])
    lines += ["", f"# paste into minimax01/ops/quant/triton_w8.py (measured {info['date']} on "
              f"{gpu}, torch {info['torch']}, triton {info.get('triton', '?')}, "
              "`python benchmarks/quant_slice.py --sweep`):", f"SHIPPED[{shipped_name(gpu)!r}] = {{"]
    for w in sorted(res["winners"], key=lambda w: w["key"]):
        lines.append(f"    {tuple(w['key'])!r}: {tuple(w['config'])!r},  # {w['matrix']} "
                     f"{w['case']}: {w['ms']:.4f} ms, {w['floor_ms'] / w['ms']:.0%} of floor")
    lines.append("}")
    x = res["dequant_min_rows"]
    lines.append(f"# grouped.py: DEQUANT_MIN_ROWS = {x}  # measured crossover (rows per expert)"
                 if x else "# grouped.py: DEQUANT_MIN_ROWS: no crossover measured")
    return "\n".join(lines)


def shipped_name(gpu: str) -> str:
    """The SHIPPED key for a device name: its model token (H200, H100, ...) where there is one."""
    for tok in gpu.replace("-", " ").split():
        if tok[:1] in "ABHL" and any(ch.isdigit() for ch in tok) and len(tok) <= 6:
            return tok
    return gpu


def install(res, device: torch.device) -> None:
    """Use the sweep's winners (and crossover) in this process."""
    if device.type != "cuda":
        return
    entry = tw.SHIPPED.setdefault(shipped_name(torch.cuda.get_device_name(device)), {})
    entry.update({tuple(w["key"]): tw.check_config(w["config"]) for w in res["winners"]})
    if res.get("dequant_min_rows"):
        gq.DEQUANT_MIN_ROWS = res["dequant_min_rows"]


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1]))
