"""Lightning attention speed: our Triton kernels against fla, OpenNLPLab lightning-attn, PyTorch
SDPA (causal softmax, flash and cuDNN) and the memory floor, on one card in one run.

    python benchmarks/lightning.py                          # the table (bf16, D = E = 128)
    python benchmarks/lightning.py --check --tune --out DIR # the GPU session (under 9 minutes)

--check: the GPU correctness cases of benchmarks/check_lightning_gpu.py, each in its own
process (CUDA_LAUNCH_BLOCKING=1, a timeout; a crash costs that case alone and names the kernel
in flight; up to --sanitize-crashes crashed cases are rerun under compute-sanitizer memcheck),
while compile-only processes fill Triton's cache with the sweep's kernels and a side process
compiles the peers'. --tune (implies --check): the sweep of benchmarks/lightning_tune.py over
the candidates whose cases passed, in a child process that is resumed past a crash; the pick
is checked once more in its own process, then used by the table ("ours"), beside the shipped
default ("default"), fla and the others, in this process (which runs no kernel of ours before
the table). Rows: the issue's prefill cases (forward and forward+backward; H64 T = 4K / 16K /
64K, H8 T = 64K / 256K, 22 packed documents in 64K tokens at H64, B = 8 x 8K at H64) and decode
at batch 1 / 64 / 256 (per layer, CUDA-graph replay over enough layers that the fp32 states do
not stay in L2).

Times are medians of triton.testing.do_bench on random inputs (softmax peers at 64K: one timed
call). Floor = bytes / measured copy rate: the forward moves q, k, v in and o out;
forward+backward adds do in and dq, dk, dv out; decode reads and writes the fp32 state. Peers
that are not installed print "not installed"; shapes a peer cannot run print n/a. Writes
DIR/lightning.json (everything), DIR/check_results.json and, with --tune,
DIR/lightning_tuning.json and DIR/lightning_sweep.json; prints the card's SHIPPED line."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from minimax01.ops import lightning_attn, lightning_decode  # noqa: E402
from minimax01.ops.lightning import lightning_slopes, triton_plan, triton_tune  # noqa: E402

DT = torch.bfloat16
D = E = 128
DECODE = [1, 64, 256]
T0 = time.time()


def elapsed():
    return f"[{time.time() - T0:5.0f} s]"


def bench(fn, warmup=25, rep=100, grad_to_none=None):
    return do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def ceilings():
    n = 1 << 31
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    bw = 2 * n / (bench(lambda: b.copy_(a)) * 1e-3)
    del a, b
    x = torch.randn(8192, 8192, device="cuda", dtype=DT)
    y = torch.randn_like(x)
    mm = 2 * 8192 ** 3 / (bench(lambda: x @ y) * 1e-3)
    del x, y
    torch.cuda.empty_cache()  # the check processes share the card
    return bw, mm


def once(fn, grad_to_none=None):
    """ms of one call after one warm-up call (do_bench runs a slow peer 8 times or more)."""
    fn()
    for x in grad_to_none or ():
        x.grad = None
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b)


def floor_ms(tokens, backward, bw):
    """Memory floor in ms: q, k, v in and o out (+ do in, dq, dk, dv out), bf16."""
    per_tok = (2 * D + 2 * E) * 2 + ((2 * D + 2 * E + 2 * D + E) * 2 if backward else 0)
    return tokens * per_tok / bw * 1e3


# ---- peers -------------------------------------------------------------------------------

NOT_INSTALLED = "not installed"


def ours(q, k, v, slope, cu):
    return lambda: lightning_attn(q, k, v, slope, cu_seqlens=cu, backend="triton")[0]


def fla_chunk(q, k, v, slope, cu):
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception:
        return NOT_INSTALLED
    g = (-slope).float()
    kw = {} if cu is None else dict(cu_seqlens=cu.long())
    return lambda: chunk_simple_gla(q, k, v, g_gamma=g, scale=1.0, **kw)[0]


def opennlp(q, k, v, slope, cu):
    try:
        from lightning_attn.ops import lightning_attn_func
    except Exception:
        return NOT_INSTALLED
    if cu is not None:
        return None
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_(x.requires_grad)
                  for x in (q, k, v))
    s = slope.float().contiguous()
    return lambda: lightning_attn_func(qt, kt, vt, s)


def sdpa(backend_name):
    def peer(q, k, v, slope, cu):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        if cu is not None or q.shape[1] > 65536:  # no packed form here; quadratic past 64K
            return None
        be = {"flash": SDPBackend.FLASH_ATTENTION,
              "cudnn": SDPBackend.CUDNN_ATTENTION}[backend_name]
        qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_(x.requires_grad) for x in (q, k, v))

        def run():
            with sdpa_kernel(be):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        try:
            run()
        except Exception:
            return None
        return run
    return peer


PEERS = [("fla", fla_chunk), ("lightning-attn", opennlp), ("sdpa-flash", sdpa("flash")),
         ("sdpa-cudnn", sdpa("cudnn"))]


def time_fn(make_fn, row, backward, override=None):
    """Median ms of one peer on one row; None where it cannot run; NOT_INSTALLED."""
    from lightning_tune import make
    name, b, t, h, lens = row
    q, k, v, slope, cu = make(b, t, h, lens, backward)
    try:
        with triton_plan.override(**(override or {})):
            fn = make_fn(q, k, v, slope, cu)
            if fn is None or fn == NOT_INSTALLED:
                return fn
            heavy = make_fn.__name__ == "peer" and t >= 65536  # softmax at 64K: seconds a call
            timer = once if heavy else (lambda f, **kw: bench(f, warmup=10, rep=60, **kw))
            if backward:
                out = fn()
                do = torch.randn_like(out)

                def run():
                    fn().backward(do)
                return timer(run, grad_to_none=[q, k, v])
            with torch.no_grad():
                return timer(fn)
    except Exception as exc:  # a peer that cannot run this shape
        print(f"  [{make_fn.__name__} {name} bwd={backward}: {type(exc).__name__}: "
              f"{str(exc)[:160]}]", file=sys.stderr, flush=True)
        return None
    finally:
        del q, k, v
        torch.cuda.empty_cache()


# ---- decode ------------------------------------------------------------------------------

def graph_per_call(fns):
    """Median time per call of `fns` (one per layer) replayed from one CUDA graph: what a
    graph-captured decode step pays per layer, without Python launch overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    return bench(g.replay, warmup=10, rep=50) / len(fns)


def decode_times(b, h=64, peers=True, **decode_kw):
    """Per-layer decode time: eager (ours) and graph-replayed over enough layers (distinct
    states) that the states do not stay in L2. Ours, fla fused_recurrent (T=1), torch."""
    from minimax01.ops.lightning.triton_decode import triton_lightning_decode
    per_layer = b * h * D * E * 4
    layers = min(64, max(4, math.ceil(160e6 / per_layer)))
    states = [torch.randn(b, h, D, E, device="cuda") * 0.01 for _ in range(layers)]
    q, k = (torch.randn(b, h, D, device="cuda", dtype=DT) * 0.3 for _ in range(2))
    v = torch.randn(b, h, E, device="cuda", dtype=DT)
    slope = lightning_slopes(h, 1, 80).cuda()
    it = [0]

    def nxt():
        it[0] = (it[0] + 1) % layers
        return states[it[0]]

    res = {}
    if peers:
        res["ours eager"] = bench(lambda: lightning_decode(q, k, v, nxt(), slope,
                                                           backend="triton"))

    def ours_fn(s):
        return lambda: triton_lightning_decode(q, k, v, s, slope, None, **decode_kw)

    def torch_fn(s):
        return lambda: lightning_decode(q, k, v, s, slope, backend="chunk")

    def fla_fn(s):
        from fla.ops.simple_gla import fused_recurrent_simple_gla
        g = (-slope).float()
        return lambda: fused_recurrent_simple_gla(q[:, None], k[:, None], v[:, None], g_gamma=g,
                                                  scale=1.0, initial_state=s,
                                                  output_final_state=True)

    makers = (("ours", ours_fn), ("torch", torch_fn), ("fla", fla_fn)) if peers else (
        ("ours", ours_fn),)
    for name, mk in makers:
        try:
            if name == "fla":
                import fla  # noqa: F401
            res[name] = graph_per_call([mk(s) for s in states])
        except ImportError:
            res[name] = NOT_INSTALLED
        except Exception as exc:
            print(f"  [{name} decode graph: {type(exc).__name__}: {str(exc)[:120]}]",
                  file=sys.stderr)
            res[name] = None
    del states
    torch.cuda.empty_cache()
    return res


# ---- the table ---------------------------------------------------------------------------

def fmt(x):
    if x == NOT_INSTALLED:
        return x
    return "n/a" if x is None else (f"{x:.4f}" if x < 0.1 else f"{x:.3f}")


def ratio(a, b):
    return a / b if isinstance(a, float) and isinstance(b, float) and b else None


def table(bw, mm, tuned, budget_left, rows, on_row=lambda: None):
    """Appends the table's rows to `rows` (calling `on_row` after each) and returns it."""
    from lightning_tune import BWD_ROWS, FWD_ROWS, tuning_override
    default_ov = tuning_override(triton_tune.DEFAULT)
    for backward, cases in ((False, FWD_ROWS), (True, BWD_ROWS)):
        for row in cases:
            name, b, t, h, lens = row
            r = {"case": name, "floor": floor_ms(b * t * h, backward, bw)}
            r["ours"] = time_fn(ours, row, backward)
            r["default"] = time_fn(ours, row, backward, default_ov) if tuned else r["ours"]
            for pname, peer in PEERS:
                if pname.startswith("sdpa") and time.time() > budget_left:
                    r[pname] = None  # out of time: softmax peers are only context
                    continue
                r[pname] = time_fn(peer, row, backward)
            print(f"{elapsed()} {name:<32} ours {fmt(r['ours'])} default {fmt(r['default'])} "
                  f"fla {fmt(r['fla'])} floor {fmt(r['floor'])}", flush=True)
            rows.append(r)
            on_row()
    for b in DECODE:
        dt = decode_times(b)
        floor = 2 * b * 64 * D * E * 4 / bw * 1e3
        r = {"case": f"decode B={b} H64", "floor": floor, "ours": dt["ours"], "fla": dt["fla"],
             "torch": dt["torch"], "eager": dt["ours eager"]}
        if isinstance(dt["ours"], float):
            r["TB/s"] = 2 * b * 64 * D * E * 4 / (dt["ours"] * 1e-3) / 1e12
        rows.append(r)
        on_row()
        print(f"{elapsed()} decode B={b}: {dt}", flush=True)
    return rows


def print_table(rows, versions, bw, mm):
    print(f"\n{versions['card']}  torch {versions['torch']}  triton {versions['triton']}  "
          f"fla {versions['fla']}  lightning-attn {versions['lightning-attn']}  "
          f"copy {bw / 1e12:.2f} TB/s  bf16 mm {mm / 1e12:.0f} TFLOP/s")
    print("times in ms, bf16, D=E=128; ours = this card's tuning, default = the shipped default; "
          "decode: fp32 state, per layer, CUDA-graph replay")
    cols = ["ours", "default", "fla", "lightning-attn", "sdpa-flash", "sdpa-cudnn", "torch",
            "floor"]
    print("| case | " + " | ".join(cols) + " | ours/fla | ours/floor | default/ours | note |")
    print("|" + "---|" * (len(cols) + 5))
    for r in rows:
        note = ""
        if "TB/s" in r:
            note = (f"{r['TB/s']:.2f} TB/s = {100 * r['TB/s'] * 1e12 / bw:.0f}% of copy; "
                    f"eager {fmt(r['eager'])}")
        print(f"| {r['case']} | " + " | ".join(fmt(r.get(c)) for c in cols)
              + f" | {fmt(ratio(r.get('ours'), r.get('fla')))}"
              f" | {fmt(ratio(r.get('ours'), r.get('floor')))}"
              f" | {fmt(ratio(r.get('default'), r.get('ours')))} | {note} |")
    goal_rows = [r for r in rows if not r["case"].startswith("decode")]
    met = [r["case"] for r in goal_rows if (ratio(r.get("ours"), r.get("fla")) or 9) <= 0.5]
    print(f"\nrows at <= 0.5x fla: {len(met)} of {len(goal_rows)}; forward rows at <= 1.4x floor: "
          f"{sum(1 for r in goal_rows if r['case'].startswith('fwd ') and (ratio(r.get('ours'), r.get('floor')) or 9) <= 1.4)}")


def versions_info():
    v = {"torch": torch.__version__, "triton": triton.__version__,
         "card": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
    for mod, key in (("fla", "fla"), ("lightning_attn", "lightning-attn")):
        try:
            m = __import__(mod)
            v[key] = getattr(m, "__version__", "installed")
        except Exception:
            v[key] = NOT_INSTALLED
    return v


def warm_peers():
    """Compile the peers' kernels (fla, lightning-attn) at the table's shapes in a side process
    while the checks run (Triton's disk cache); their autotuning runs again in the table, on
    an idle GPU, so that it is not skewed by the checks running beside it."""
    from lightning_tune import BWD_ROWS, FWD_ROWS
    n = 0
    for backward, rows in ((False, FWD_ROWS), (True, BWD_ROWS)):
        for name, b, t, h, lens in rows:
            for make_fn in (fla_chunk, opennlp):
                try:
                    from lightning_tune import make
                    q, k, v, slope, cu = make(b, min(t, 16384), h, lens if lens is None else
                                              [4096] * 4, backward)
                    fn = make_fn(q, k, v, slope, cu)
                    if fn is None or fn == NOT_INSTALLED:
                        continue
                    if backward:
                        fn().float().sum().backward()
                    else:
                        with torch.no_grad():
                            fn()
                    n += 1
                except Exception as exc:
                    print(f"  [warm peers {make_fn.__name__} {name}: {type(exc).__name__}: "
                          f"{str(exc)[:100]}]", flush=True)
    torch.cuda.synchronize()
    print(f"warm peers: {n} runs", flush=True)


def summarize_checks(results):
    bad = {n: r for n, r in results.items() if r["status"] != "ok"}
    print(f"{elapsed()} checks: {len(results) - len(bad)} of {len(results)} cases passed"
          + ("" if not bad else "; NOT PASSED: " + ", ".join(f"{n} ({r['status']})"
                                                           for n, r in bad.items())), flush=True)
    return [f"check {n}: {r['status']}" for n, r in bad.items()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="GPU correctness checks first, each "
                    "case in its own process (benchmarks/check_lightning_gpu.py)")
    ap.add_argument("--tune", action="store_true", help="sweep the schedules whose checks "
                    "passed (implies --check), pick this card's tuning")
    ap.add_argument("--check-budget-s", type=float, default=130,
                    help="cases not started by then are not run (their options not swept)")
    ap.add_argument("--tune-budget-s", type=float, default=130)
    ap.add_argument("--parallel", type=int, default=8, help="check processes at a time")
    ap.add_argument("--warm-procs", type=int, default=4,
                    help="compile-only processes filling the kernel cache during the checks")
    ap.add_argument("--only", default=None, help="comma-separated check cases (default: all)")
    ap.add_argument("--sanitize-crashes", type=int, default=2,
                    help="rerun this many crashed cases under compute-sanitizer memcheck")
    ap.add_argument("--sanitize-timeout", type=float, default=60)
    ap.add_argument("--no-table", action="store_true")
    ap.add_argument("--no-long", action="store_true", help="skip the 1M-token case")
    ap.add_argument("--tuning", default=None, help="a lightning_tuning.json to use")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--total-budget-s", type=float, default=450,
                    help="softmax peers are skipped once this much time has gone")
    ap.add_argument("--warm-peers", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warm_peers:
        warm_peers()
        return
    args.check = args.check or args.tune
    os.makedirs(args.out, exist_ok=True)
    versions = versions_info()
    print(versions, flush=True)
    if args.tuning:
        triton_tune.load(args.tuning)
    bw, mm = ceilings()
    print(f"{elapsed()} copy {bw / 1e12:.2f} TB/s (read+write), bf16 matmul {mm / 1e12:.0f} "
          f"TFLOP/s", flush=True)
    out = {"versions": versions, "bw": bw, "mm": mm}
    failed = []
    tuned = None

    def save():  # after every phase: a run killed by its time limit keeps what it measured
        out["wall_s"] = time.time() - T0
        out["check_failures"] = failed
        with open(os.path.join(args.out, "lightning.json"), "w") as f:
            json.dump(out, f, indent=1, default=str)

    def phase(name, fn):
        """One phase; a crash is reported (and counted as a failure) and the run goes on, so
        one bad phase never costs the others' numbers. (Kernels run in this process only in
        the table: the checks and the sweep run theirs in child processes.)"""
        try:
            return fn()
        except Exception:
            import traceback
            traceback.print_exc()
            failed.append(f"phase {name} crashed")
            return None

    import check_lightning_gpu as chk
    import lightning_tune
    from lightning_isolate import Job, python_argv
    results = None
    import tempfile
    work = tempfile.mkdtemp(prefix="lightning_run_")  # case files, traces: not for $OUT
    if args.check:
        names = ([n.strip() for n in args.only.split(",")] if args.only else
                 [n for n in chk.cases() if n != chk.CHOSEN_CASE
                  and not (args.no_long and n.startswith("long"))])
        extra = []
        if args.tune:
            extra += lightning_tune.warm_jobs(args.warm_procs, work, args.check_budget_s)
        if not args.no_table:
            extra.append(Job("warm peers", python_argv(os.path.abspath(__file__),
                                                       "--warm-peers"), args.check_budget_s))
        results = phase("checks", lambda: chk.run_isolated(
            names, parallel=args.parallel + len(extra), sanitize=args.sanitize_crashes,
            sanitize_timeout=args.sanitize_timeout, work_dir=work, extra_jobs=extra,
            deadline=time.time() + args.check_budget_s,
            log=lambda m: print(m, flush=True))) or {}
        out["checks"] = {n: {k: v for k, v in r.items() if k != "lines"}
                         for n, r in results.items()}
        with open(os.path.join(args.out, "check_results.json"), "w") as f:
            json.dump(results, f, indent=1)
        failed += summarize_checks(results)
        save()
    if args.tune:
        allow = lightning_tune.allowed(results)
        out["allowed"] = lightning_tune.allowed_to_json(allow)
        tuned = phase("tune", lambda: lightning_tune.run(args.out, args.tune_budget_s, bw, allow,
                                                         log=lambda m: print(m, flush=True),
                                                         work_dir=work))
        if tuned is not None and tuned != triton_tune.DEFAULT:
            # the pick as a whole, in its own process, before this process runs it
            path = os.path.join(args.out, "lightning_tuning.json")
            res = phase("chosen check", lambda: chk.run_isolated(
                [chk.CHOSEN_CASE], parallel=1, sanitize=0, work_dir=work,
                env={"MINIMAX01_LIGHTNING_TUNING": path},
                log=lambda m: print(m, flush=True))) or {}
            if not chk.passed(res, chk.CHOSEN_CASE):
                failed.append("check chosen tuning: not passed (table uses the default)")
                tuned = None
        if tuned is not None:
            out["tuning"] = tuned.to_json()
            triton_tune.load({lightning_tune.card_key(): tuned})
        save()
        print(f"{elapsed()} tuned", flush=True)
    if not args.no_table:
        out["rows"] = []
        phase("table", lambda: table(bw, mm, tuned is not None, T0 + args.total_budget_s,
                                     out["rows"], save))
        phase("print", lambda: print_table(out["rows"], versions, bw, mm))
    if tuned is not None:
        print(f"\nH200 tuning entry (SHIPPED in minimax01/ops/lightning/triton_tune.py):\n"
              f"    {lightning_tune.card_key()!r}: {tuned!r},", flush=True)
    save()
    print(f"{elapsed()} wrote {os.path.join(args.out, 'lightning.json')}"
          + (f"; FAILURES: {failed}" if failed else "; all checks passed" if args.check
             else ""), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
