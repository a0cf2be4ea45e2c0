"""GPU correctness of the Triton lightning-attention kernels, every case in its own process.

    python benchmarks/check_lightning_gpu.py                  # every case (about 1-2 min, H200)
    python benchmarks/check_lightning_gpu.py --only 'tiles bt64 bv32 w4 s3 tma,lpt'
    python benchmarks/check_lightning_gpu.py --sanitize 'tiles bt64 bv32 w4 s3 tma'
    python benchmarks/check_lightning_gpu.py --list

(`benchmarks/lightning.py --check` runs the same cases inside the full benchmark.) A case is a
handful of checks that compare against the chunked torch reference (fp32; float64 for fp32
inputs; TF32 off) by ||x - ref|| / ||ref||: outputs, final states and all gradients (through a
loss that also uses the final state). Cases: the shipped default schedule on head dims
64/128/256, D != E, ragged lengths, packed documents (empty, shorter than a block, crossing
blocks), split and unsplit sequences, host and device offsets, fp32 / fp16 / bf16, H = 8 at 64K
(auto split), 1M tokens with decays near 1 and near exp(-1); decode with a slot pool, bad
device slots (nothing outside the pool touched) and every decode variant of the sweep;
device offsets under torch's sync-debug mode "error" and in a CUDA graph; then one case for
every tile set, fused dk+dv tile set and the longest-first order the sweep may choose
(benchmarks/lightning_tune.py), on a batch and on packed documents with a device-built
segment table. The sweep only uses what passed here.

Each case runs in a fresh subprocess (benchmarks/lightning_isolate.py) under
CUDA_LAUNCH_BLOCKING=1 (not the CUDA-graph case) with a timeout, so an illegal memory access
costs that case alone and names the kernel in flight; a crashed case is then rerun under
compute-sanitizer memcheck (capped at --sanitize-timeout seconds) for the faulting kernel and
source line. Prints one line per case: ok / FAIL / CRASH / TIMEOUT. Exits non-zero on any
failure."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

FAILS = []
TOL = {torch.bfloat16: 1.5e-2, torch.float16: 4e-3, torch.float32: 1e-4}
LENS = [0, 1, 63, 64, 65, 5000, 0, 7, 12000]  # + 40 random lengths below 700 (packed_lens)


def packed_lens():
    g = torch.Generator().manual_seed(3)
    return LENS + torch.randint(0, 700, (40,), generator=g).tolist()


# ---- one check (inside a case's process) -----------------------------------------------------

def rel(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def report(name, errs, tol):
    worst = max(errs.values())
    ok = worst < tol
    if not ok:
        FAILS.append(name)
    print(f"{'ok  ' if ok else 'FAIL'} {name:<58} " +
          " ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)


def inputs(b, t, h, d, e, dtype, seed, slope=None):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = (torch.randn(b, t, h, d, device="cuda", generator=g) * d ** -0.5 * 2).to(dtype)
    k = (torch.randn(b, t, h, d, device="cuda", generator=g) * d ** -0.5 * 2).to(dtype)
    v = torch.randn(b, t, h, e, device="cuda", generator=g).to(dtype)
    if slope is None:
        slope = torch.logspace(-4, 0, h, device="cuda")
    return q, k, v, slope.float().cuda()


def check(name, b, t, h, d, e, dtype=torch.bfloat16, lens=None, state=True, grads=True,
          seed=0, slope=None, ref_block=64, cu_host=False, **override):
    from minimax01.ops import lightning_attn
    from minimax01.ops.lightning import triton_plan

    q, k, v, slope = inputs(b, t, h, d, e, dtype, seed, slope)
    cu = None
    n = b
    if lens is not None:
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32,
                          device="cpu" if cu_host else "cuda")
        n = len(lens)
    s0 = torch.randn(n, h, d, e, device="cuda") if state else None
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    w_o = torch.randn(b, t, h, e, device="cuda", generator=g)
    w_s = torch.randn(n, h, d, e, device="cuda", generator=g) * 0.01
    # the reference: fp32 products (never TF32), float64 for fp32 inputs (their tolerance is
    # 1e-4; TF32 alone costs ~4e-4, what the first H200 run's fp32 check measured)
    ref_dt = torch.float64 if dtype == torch.float32 else torch.float32
    res = []
    for backend, acc in (("triton", torch.float32), ("chunk", ref_dt)):
        cast = (lambda x: x) if backend == "triton" else (lambda x: x.to(ref_dt))
        xs = [cast(x).detach().requires_grad_(grads) for x in (q, k, v)]
        st = None if s0 is None else cast(s0).clone().requires_grad_(grads)
        with triton_plan.override(**override):
            o, fs = lightning_attn(*xs, slope, initial_state=st, output_final_state=True,
                                   cu_seqlens=cu, backend=backend,
                                   block_size=None if backend == "triton" else ref_block)
            gr = []
            if grads:
                loss = (o.to(acc) * w_o.to(acc)).sum() + (fs.to(acc) * w_s.to(acc)).sum()
                leaves = xs + ([st] if st is not None else [])
                gr = torch.autograd.grad(loss, leaves)
        res.append((o.detach(), fs.detach(), gr))
    (o, fs, gr), (o_r, fs_r, gr_r) = res
    assert o.dtype == dtype and fs.dtype == torch.float32
    errs = {"o": rel(o, o_r), "S": rel(fs, fs_r)}
    for key, a, bb in zip(("dq", "dk", "dv", "ds0"), gr, gr_r):
        errs[key] = rel(a, bb)
    report(name, errs, TOL[dtype])


def check_decode():
    from minimax01.ops import lightning_decode

    b, h, d, e = 5, 8, 128, 128
    q, k, v, slope = inputs(b, 4, h, d, e, torch.bfloat16, 7)
    pool = torch.full((9, h, d, e), float("nan"), device="cuda")
    idx = torch.tensor([7, 0, 3, 8, 1], device="cuda")
    pool[idx] = torch.randn(b, h, d, e, device="cuda")
    ref = pool[idx].clone()
    errs = {}
    for t in range(4):
        o = lightning_decode(q[:, t], k[:, t], v[:, t], pool, slope, slot_idx=idx, backend="triton")
        o_r = lightning_decode(q[:, t], k[:, t], v[:, t], ref, slope, backend="chunk")
        errs[f"o{t}"] = rel(o, o_r)
    errs["S"] = rel(pool[idx], ref)
    untouched = torch.isnan(pool[[2, 4, 5, 6]]).all().item()
    errs["pool"] = 0.0 if untouched else float("inf")
    report("decode bf16 slot pool B=5 H=8 D=E=128", errs, 1e-2)


def check_decode_variants():
    """Every (block_v, warps, evict) the sweep may pick for decode, batch 3 x 64 heads."""
    from lightning_tune import DECODE

    from minimax01.ops import lightning_decode
    from minimax01.ops.lightning.triton_decode import triton_lightning_decode

    b, h, d, e = 3, 64, 128, 128
    q, k, v, slope = inputs(b, 1, h, d, e, torch.bfloat16, 9)
    q, k, v = q[:, 0], k[:, 0], v[:, 0]
    s = torch.randn(b, h, d, e, device="cuda") * 0.1
    ref = s.clone()
    o_r = lightning_decode(q, k, v, ref, slope, backend="chunk")
    errs = {}
    for bv, nw, ev in DECODE:
        st = s.clone()
        o = triton_lightning_decode(q, k, v, st, slope, None, block_v=bv, num_warps=nw,
                                    evict=bool(ev))
        errs[f"{bv}/{nw}/{ev}"] = max(rel(o, o_r), rel(st, ref))
    report("decode variants of the sweep (bv/warps/evict)", errs, 1e-2)


def check_long(t, h, grads):
    """1M tokens: decays near 1 and near exp(-1); the reference is the fp32 chunked form."""
    slope = torch.tensor([1e-5, 1e-3, 0.5, 0.99][:h])
    t0 = time.time()
    check(f"long T={t} H={h} bf16 slopes {slope.tolist()}{' +grads' if grads else ''}",
          1, t, h, 128, 128, slope=slope, grads=grads, state=True, ref_block=256)
    print(f"     ({time.time() - t0:.1f} s)", flush=True)


def check_bad_slots():
    """Bad slots in a device tensor (not read back): nothing outside the named rows is written,
    the bad rows' outputs are NaN, the CUDA context survives."""
    from minimax01.ops import lightning_decode
    from minimax01.ops.lightning.triton_decode import triton_lightning_decode

    b, h, d, e, n = 4, 8, 128, 128, 6
    q, k, v, slope = inputs(b, 1, h, d, e, torch.bfloat16, 11)
    q, k, v = q[:, 0], k[:, 0], v[:, 0]
    pool = torch.randn(n + 2, h, d, e, device="cuda")  # rows n, n+1: guard rows past the pool
    before = pool.clone()
    idx = torch.tensor([2, -1, n, 2 ** 33 + 1], device="cuda")
    o = triton_lightning_decode(q, k, v, pool[:n], slope, slot_idx=idx)
    torch.cuda.synchronize()
    ok_rows = [r for r in range(n + 2) if r != 2]
    errs = {"untouched": 0.0 if torch.equal(pool[ok_rows], before[ok_rows]) else float("inf"),
            "nan_rows": 0.0 if torch.isnan(o[1:]).all() else float("inf")}
    ref = before[2:3].clone()
    o_r = lightning_decode(q[:1], k[:1], v[:1], ref, slope, backend="chunk")
    errs["o"] = rel(o[:1], o_r)
    errs["S"] = rel(pool[2:3], ref)
    report("decode: bad device slots (-1, N, 2^33+1) touch nothing", errs, 1e-2)


def check_no_sync_and_graph():
    """Forward + backward with device offsets under sync-debug 'error' (any host sync raises),
    then the forward captured in a CUDA graph (split plan: the device segment table) vs eager."""
    from minimax01.ops import lightning_attn

    lens = [3000, 17, 0, 9000, 4367]
    q, k, v, slope = inputs(1, sum(lens), 8, 128, 128, torch.bfloat16, 5)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32,
                      device="cuda")
    xs = [x.detach().requires_grad_() for x in (q, k, v)]
    # warm-up: the slope's one-time check, the kernels' first launches
    lightning_attn(*xs, slope, cu_seqlens=cu, backend="triton")[0].float().sum().backward()
    torch.cuda.synchronize()
    errs = {}
    torch.cuda.set_sync_debug_mode("error")
    try:
        o, _ = lightning_attn(*xs, slope, cu_seqlens=cu, backend="triton")
        o.float().sum().backward()
        errs["sync"] = 0.0
    except RuntimeError as exc:
        print(f"     sync: {str(exc)[:200]}")
        errs["sync"] = float("inf")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    with torch.no_grad():
        eager, _ = lightning_attn(q, k, v, slope, cu_seqlens=cu, backend="triton")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            lightning_attn(q, k, v, slope, cu_seqlens=cu, backend="triton")
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out, _ = lightning_attn(q, k, v, slope, cu_seqlens=cu, backend="triton")
            graph.replay()
            torch.cuda.synchronize()
            errs["graph"] = rel(out, eager)
        except Exception as exc:
            print(f"     graph: {type(exc).__name__}: {str(exc)[:200]}")
            errs["graph"] = float("inf")
    report("no host sync (fwd+bwd, device cu_seqlens); CUDA graph fwd", errs, 1e-6)


# ---- the cases ----------------------------------------------------------------------------

def _default_shapes(small):
    check("bf16 B=2 T=3000 H=4 D=E=128", 2, 3000 if not small else 300, 4, 128, 128)
    check("bf16 B=2 T=3000 H=4 D=E=128 split 1024", 2, 3000 if not small else 300, 4, 128, 128,
          seg_len=1024 if not small else 128)
    if small:
        return
    check("bf16 B=1 T=777 H=3 D=E=64", 1, 777, 3, 64, 64)
    check("bf16 B=1 T=1000 H=2 D=E=256 split 256", 1, 1000, 2, 256, 256, seg_len=256)
    check("bf16 B=1 T=1000 H=2 D=128 E=64", 1, 1000, 2, 128, 64)
    check("bf16 B=1 T=1000 H=2 D=64 E=256 split 512", 1, 1000, 2, 64, 256, seg_len=512)
    check("bf16 T=1 H=4 D=E=128", 3, 1, 4, 128, 128)
    check("bf16 block 16", 1, 500, 2, 128, 128, block_t=16)
    check("bf16 block 128", 1, 500, 2, 128, 128, block_t=128)


def _default_dtypes_varlen(small):
    lens = packed_lens() if not small else [0, 1, 63, 65, 200]
    check("fp32 B=1 T=1500 H=2 D=E=128 split 512", 1, 1500 if not small else 300, 2, 128, 128,
          dtype=torch.float32, seg_len=512 if not small else 128)
    if small:
        check("varlen device offsets split 128", 1, sum(lens), 4, 128, 128, lens=lens,
              seg_len=128)
        return
    check("fp16 B=2 T=2049 H=2 D=E=128", 2, 2049, 2, 128, 128, dtype=torch.float16)
    check(f"varlen bf16 {len(lens)} docs T={sum(lens)} H=4", 1, sum(lens), 4, 128, 128, lens=lens)
    check(f"varlen bf16 {len(lens)} docs split 1024", 1, sum(lens), 4, 128, 128, lens=lens,
          seg_len=1024)
    check("varlen host offsets (CPU cu_seqlens), split", 1, sum(lens), 4, 128, 128, lens=lens,
          cu_host=True, seg_len=2048)
    check("varlen device offsets, auto plan (H=2: split assumed)", 1, sum(lens), 2, 128, 128,
          lens=lens)


def _default_h8(small):
    t = 65536 if not small else 4096
    check(f"bf16 H=8 T={t} (auto split)", 1, t, 8, 128, 128, grads=True)


def _decode(small):
    check_decode()
    check_bad_slots()
    if not small:
        check_decode_variants()


def _nosync(small):
    check_no_sync_and_graph()


def _long(small):
    if small:
        check_long(1 << 16, 2, grads=True)
        return
    check_long(1 << 20, 4, grads=False)
    check_long(1 << 20, 2, grads=True)


def _schedule(ov, extra=()):
    def run(small):
        lens = packed_lens() if not small else [0, 1, 63, 65, 200]
        tag = ov.get("_tag")
        o = {k: v for k, v in ov.items() if k != "_tag"}
        check(f"[{tag}] bf16 B=2 T=3000 H=4", 2 if not small else 1, 3000 if not small else 300,
              4 if not small else 2, 128, 128, **o)
        check(f"[{tag}] varlen {len(lens)} docs device segment table", 1, sum(lens), 4, 128,
              128, lens=lens, seg_len=1024 if not small else 128, **o)
        if not small:
            for name, args, kw in extra:
                check(f"[{tag}] {name}", *args, **dict(o, **kw))
    return run


def tiles_override(t, prefix=""):
    return {f"{prefix}block_t": t.block_t, f"{prefix}block_v": t.block_v,
            f"{prefix}num_warps": t.num_warps, f"{prefix}num_stages": t.num_stages,
            f"{prefix}tma": t.tma}


def tiles_case(t) -> str:
    """The case that proves scan tile set `t` (every scan pass at once)."""
    from lightning_tune import label
    return f"tiles {label(t)}"


def fused_case(t) -> str:
    from lightning_tune import label
    return f"fused {label(t)}"


LPT_CASE = "lpt"
DECODE_CASE = "decode"
CHOSEN_CASE = "chosen tuning"
SLOW_CASES = ("long 1M", "default H8 64K")
NO_LAUNCH_BLOCKING = ("no-sync+graph",)
DEFAULT_CASES = ("default shapes", "default dtypes+varlen", "default H8 64K", "no-sync+graph")


def cases() -> dict:
    """name -> (function(small), timeout s). Default-schedule cases first, then the schedules
    of the sweep (benchmarks/lightning_tune.py: every distinct tile set, fused tile set, lpt)."""
    from lightning_tune import BWD, FUSED, FWD, STATE

    from minimax01.ops.lightning.triton_tune import DEFAULT

    out = {"default shapes": (_default_shapes, 120),
           "default dtypes+varlen": (_default_dtypes_varlen, 120),
           "default H8 64K": (_default_h8, 120), "no-sync+graph": (_nosync, 90),
           DECODE_CASE: (_decode, 90), "long 1M": (_long, 180)}
    seen = {DEFAULT.fwd}
    for t in FWD + STATE + BWD:
        if t not in seen:
            seen.add(t)
            out[tiles_case(t)] = (_schedule(dict(tiles_override(t), _tag=tiles_case(t))), 120)
    lens = packed_lens()
    for i, t in enumerate(FUSED):
        extra = [] if i else [
            ("D=E=64 T=777 H=3", (1, 777, 3, 64, 64), {}),
            ("fp32 T=1500 H=2 split", (1, 1500, 2, 128, 128),
             dict(dtype=torch.float32, seg_len=512))]
        ov = dict(tiles_override(t, "fused_"), fused=True, _tag=fused_case(t))
        out[fused_case(t)] = (_schedule(ov, extra), 150)
    out[LPT_CASE] = (_schedule(dict(lpt=True, _tag="lpt"), [
        # documents as items in longest-first order: device offsets (argsort) and host offsets
        ("varlen device offsets, order", (1, sum(lens), 4, 128, 128),
         dict(lens=lens, seg_len=1 << 30)),
        ("varlen host offsets, order", (1, sum(lens), 4, 128, 128),
         dict(lens=lens, seg_len=1 << 30, cu_host=True))]), 120)
    if os.environ.get("LIGHTNING_CHECK_SELFTEST"):  # the harness's own test (CPU, no GPU)
        out.update(_selftest_cases())
    # the sweep's pick, loaded from MINIMAX01_LIGHTNING_TUNING (run only when asked for)
    out[CHOSEN_CASE] = (_schedule(dict(_tag="chosen tuning"), [
        ("bf16 H=8 T=20000 split rule", (1, 20000, 8, 128, 128), {}),
        ("varlen host offsets", (1, sum(lens), 4, 128, 128), dict(lens=lens, cu_host=True))]),
        120)
    return out


def _selftest_cases():
    def crash(small):
        print("ok   before the crash", flush=True)
        os.abort()

    def hang(small):
        time.sleep(120)
    return {"selftest ok": (lambda small: report("selftest ok", {"o": 0.0}, 1.0), 30),
            "selftest fail": (lambda small: report("selftest fail", {"o": 1.0}, 0.5), 30),
            "selftest raise": (lambda small: 1 / 0, 30),
            "selftest crash": (crash, 30), "selftest hang": (hang, 2)}


def run_case(name: str, small: bool, json_path: str | None) -> int:
    """One case in this process: 0 all passed, 1 a check failed, 3 crashed (CUDA error)."""
    from lightning_isolate import trace_launches
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    trace_launches()
    fn, _ = cases()[name]
    t0 = time.time()
    status, err = "ok", None
    try:
        fn(small)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except Exception as exc:  # a crash: CUDA errors are sticky, the rest of the case is void
        import traceback
        traceback.print_exc()
        status, err = "CRASH", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    if status == "ok" and FAILS:
        status = "FAIL"
    res = dict(case=name, status=status, fails=FAILS, error=err, seconds=time.time() - t0)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(res, f)
    return {"ok": 0, "FAIL": 1}.get(status, 3)


# ---- the parent: every case in its own process ------------------------------------------------

def run_isolated(names=None, parallel=8, launch_blocking=True, sanitize=2, sanitize_timeout=60,
                 work_dir=None, deadline=None, extra_jobs=(), small=False, env=None,
                 log=print) -> dict:
    """Run the named cases (default: all) each in a fresh process, `parallel` at a time; rerun
    up to `sanitize` crashed ones small under compute-sanitizer. Returns {case: result} with
    result = dict(status, seconds, fails, error, in_flight, sanitizer). `extra_jobs`
    (lightning_isolate.Job) share the slots (lightning.py's compile-only warm-up)."""
    import tempfile

    from lightning_isolate import (Job, last_launch, python_argv, run_jobs, sanitizer_argv,
                                   sanitizer_summary)

    all_cases = cases()
    names = [n for n in all_cases if n != CHOSEN_CASE] if names is None else list(names)
    unknown = [n for n in names if n not in all_cases]
    if unknown:
        raise SystemExit(f"error: unknown check case(s) {unknown}; --list shows them")
    work_dir = work_dir or tempfile.mkdtemp(prefix="lightning_checks_")
    os.makedirs(work_dir, exist_ok=True)
    script = os.path.abspath(__file__)
    results, sanitized = {}, []
    env = dict(env or {}, **({"CUDA_LAUNCH_BLOCKING": "1"} if launch_blocking else {}))

    def job_for(name, i, under_sanitizer=False):
        base = os.path.join(work_dir, f"case{i}{'_san' if under_sanitizer else ''}")
        argv = python_argv(script, "--case", name, "--json", base + ".json")
        # the rerun under memcheck repeats the crashed case as it was (its kernels come from
        # the cache: same shapes, same specialisations), except the slow ones, small
        if small or (under_sanitizer and name in SLOW_CASES):
            argv.append("--small")
        job_env = dict(env)
        if name in NO_LAUNCH_BLOCKING:  # graph capture and synchronous launches do not mix
            job_env.pop("CUDA_LAUNCH_BLOCKING", None)
        timeout = all_cases[name][1]
        if under_sanitizer:
            wrapped = sanitizer_argv(argv)
            if wrapped is None:
                return None
            argv, extra = wrapped
            job_env.update(extra)
            timeout = sanitize_timeout
        job = Job(name, argv, timeout, job_env, trace=base + ".trace")
        job.json = base + ".json"
        job.sanitizer = under_sanitizer
        return job

    def on_done(job, queue):
        if not hasattr(job, "json"):  # a job of the caller's (warm-up)
            last = (job.out.strip().splitlines() or [""])[-1][:120]
            log(f"  [{job.name}: rc={job.rc}{' timed out' if job.timed_out else ''}, "
                f"{job.seconds:.0f} s] {last}")
            return
        res = None
        if os.path.exists(job.json):
            with open(job.json) as f:
                res = json.load(f)
        lines = [ln for ln in job.out.splitlines() if ln.startswith(("ok  ", "FAIL", "     "))]
        if job.sanitizer:
            summary = sanitizer_summary(job.out)
            why = f"rc {job.rc}{', timed out' if job.timed_out else ''}"
            results[job.name]["sanitizer"] = summary or [f"no memcheck report ({why})"]
            log(f"  sanitizer [{job.name}] ({job.seconds:.0f} s):")
            for ln in results[job.name]["sanitizer"]:
                log(f"      {ln}")
            return
        if res is None:
            status = "TIMEOUT" if job.timed_out else ("NOT RUN" if job.rc is None else "CRASH")
            res = dict(case=job.name, status=status, fails=[], seconds=job.seconds,
                       error=(job.out.strip().splitlines() or ["(no output)"])[-1][:200])
        if res["status"] in ("CRASH", "TIMEOUT"):
            res["in_flight"] = last_launch(job.trace)
        res["lines"] = lines
        results[job.name] = res
        tail = f"({res['seconds']:.0f} s)"
        if res["status"] == "ok":
            log(f"ok      {job.name:<34} {len(lines)} checks {tail}")
        elif res["status"] == "FAIL":
            log(f"FAIL    {job.name:<34} {res['fails']} {tail}")
        else:
            log(f"{res['status']:<7} {job.name:<34} {res.get('error')} {tail}")
            log(f"        in flight: {res.get('in_flight')}")
        for ln in lines:
            if not ln.startswith("ok  ") or res["status"] != "ok":
                log(f"        {ln}")
        if res["status"] == "CRASH" and len(sanitized) < sanitize:
            sj = job_for(job.name, len(sanitized) + 1000, under_sanitizer=True)
            if sj is not None:
                sanitized.append(job.name)
                queue.insert(0, sj)  # next free slot
            elif not sanitized:
                sanitized.append(None)
                log("  (compute-sanitizer not found: no memcheck rerun)")

    # the longest (1M tokens) first, then what the sweep needs whatever else passes (the
    # default schedule, decode), then the TMA cases (they crashed in the first GPU run: their
    # memcheck reruns then overlap the rest), then the others, longest first
    def rank(n):
        return (0 if n.startswith("long") else 1 if n in DEFAULT_CASES + (DECODE_CASE,) else
                2 if "tma" in n else 3, -all_cases[n][1])
    order = sorted(names, key=rank)
    jobs = [job_for(n, i) for i, n in enumerate(order)]
    run_jobs(list(extra_jobs) + jobs, parallel, on_done, deadline=deadline)
    return results


def passed(results: dict, name: str) -> bool:
    return results.get(name, {}).get("status") == "ok"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", help="run one case in this process (what the parent starts)")
    ap.add_argument("--json", help="with --case: write its result here")
    ap.add_argument("--small", action="store_true", help="small shapes (for the sanitizer)")
    ap.add_argument("--only", help="comma-separated case names (default: all)")
    ap.add_argument("--list", action="store_true", help="print the case names")
    ap.add_argument("--parallel", type=int, default=6)
    ap.add_argument("--no-launch-blocking", action="store_true",
                    help="cases without CUDA_LAUNCH_BLOCKING=1 (faster; vaguer crash reports)")
    ap.add_argument("--sanitize", help="comma-separated cases to run under "
                    "compute-sanitizer memcheck only (the slow ones small)")
    ap.add_argument("--sanitize-timeout", type=float, default=60)
    ap.add_argument("--out", default=None, help="write check_results.json here")
    args = ap.parse_args()
    if args.case:
        sys.exit(run_case(args.case, args.small, args.json))
    if args.list:
        for name, (_, timeout) in cases().items():
            print(f"{name:<40} timeout {timeout} s")
        return
    print(torch.__version__, flush=True)
    t0 = time.time()
    if args.sanitize:
        from lightning_isolate import Job, python_argv, run_jobs, sanitizer_argv, sanitizer_summary
        jobs = []
        for name in args.sanitize.split(","):
            argv = python_argv(os.path.abspath(__file__), "--case", name.strip(),
                               *(["--small"] if name.strip() in SLOW_CASES else []))
            wrapped = sanitizer_argv(argv)
            if wrapped is None:
                raise SystemExit("error: compute-sanitizer not found")
            jobs.append(Job(name.strip(), wrapped[0], args.sanitize_timeout, wrapped[1]))
        for job in run_jobs(jobs, parallel=len(jobs)):
            print(f"[{job.name}] rc={job.rc} {'TIMEOUT ' if job.timed_out else ''}"
                  f"({job.seconds:.0f} s)")
            for ln in sanitizer_summary(job.out, 30) or job.out.splitlines()[-15:]:
                print(f"    {ln}")
        return
    names = [n.strip() for n in args.only.split(",")] if args.only else None
    res = run_isolated(names, parallel=args.parallel,
                       launch_blocking=not args.no_launch_blocking,
                       sanitize_timeout=args.sanitize_timeout)
    bad = [n for n, r in res.items() if r["status"] != "ok"]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "check_results.json"), "w") as f:
            json.dump(res, f, indent=1)
    print(f"{len(res) - len(bad)} of {len(res)} cases passed in {time.time() - t0:.0f} s"
          + (f"; NOT PASSED: {bad}" if bad else ""), flush=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
