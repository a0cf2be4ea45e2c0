"""GPU correctness of the Triton lightning-attention kernels at sizes the CPU tests cannot reach.

    python benchmarks/check_lightning_gpu.py           # everything (about a minute on an H100)
    python benchmarks/check_lightning_gpu.py --quick   # skip the 1M-token checks

(`benchmarks/lightning.py --check` runs the same checks inside the full benchmark.)

Each check compares against the chunked torch reference in fp32 (computed from the same
bf16-rounded inputs) by ||x - ref|| / ||ref||: outputs, final states and all gradients (through a
loss that also uses the final state), for head dims 64/128/256, D != E, ragged lengths, packed
documents (empty, shorter than a block, crossing blocks), split and unsplit sequences, fp32 /
fp16 / bf16, decode with a state pool, and sequences of 1M tokens with decays near 1 (slope
1e-5) and near exp(-1); then every schedule the tuning can pick (TMA loads, tile shapes, the
fused dk+dv pass, device-built segment tables, host offsets, longest-first order); bad decode
slots on the GPU (nothing outside the pool is touched); and the forward and backward with
device-resident offsets under torch's sync-debug mode "error" and inside a CUDA graph (no host
synchronisation). Exits non-zero on any failure."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from minimax01.ops import lightning_attn, lightning_decode
from minimax01.ops.lightning import triton_plan

FAILS = []
TOL = {torch.bfloat16: 1.5e-2, torch.float16: 4e-3, torch.float32: 1e-4}


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
    res = []
    for backend, cast in (("triton", lambda x: x), ("chunk", lambda x: x.float())):
        xs = [cast(x).detach().requires_grad_(grads) for x in (q, k, v)]
        st = None if s0 is None else s0.clone().requires_grad_(grads)
        with triton_plan.override(**override):
            o, fs = lightning_attn(*xs, slope, initial_state=st, output_final_state=True,
                                   cu_seqlens=cu, backend=backend,
                                   block_size=None if backend == "triton" else ref_block)
            gr = []
            if grads:
                loss = (o.float() * w_o).sum() + (fs * w_s).sum()
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


def check_long(t, h, grads):
    """1M tokens: decays near 1 and near exp(-1); the reference is the fp32 chunked form."""
    slope = torch.tensor([1e-5, 1e-3, 0.5, 0.99][:h])
    t0 = time.time()
    check(f"long T={t} H={h} bf16 slopes {slope.tolist()}{' +grads' if grads else ''}",
          1, t, h, 128, 128, slope=slope, grads=grads, state=True, ref_block=256)
    print(f"     ({time.time() - t0:.1f} s)", flush=True)


SCHEDULES = [
    ("tma", dict(tma=True)),
    ("fused dk+dv", dict(fused=True)),
    ("fused dk+dv tma", dict(fused=True, tma=True)),
    ("bv64 w8 s2", dict(block_v=64, num_warps=8, num_stages=2)),
    ("bv16 s3", dict(block_v=16, num_stages=3)),
    ("bt32 tma", dict(block_t=32, tma=True)),
    ("bv128 w8 s2", dict(block_v=128, num_warps=8, num_stages=2)),
    ("lpt", dict(lpt=True)),
]


def schedule_jobs():
    """(name, args, kwargs) of the checks of every schedule the tuning can choose, on split,
    unsplit and packed inputs (run here, or spread over processes by lightning.py)."""
    g = torch.Generator().manual_seed(3)
    lens = [0, 1, 63, 64, 65, 5000, 0, 7, 12000] + torch.randint(0, 700, (40,), generator=g).tolist()
    jobs = []
    for name, ov in SCHEDULES:
        jobs.append((f"[{name}] bf16 B=2 T=3000 H=4", (2, 3000, 4, 128, 128), ov))
        jobs.append((f"[{name}] bf16 B=1 T=5000 H=2 split 1024", (1, 5000, 2, 128, 128),
                     dict(seg_len=1024, **ov)))
        jobs.append((f"[{name}] varlen {len(lens)} docs device segment table",
                     (1, sum(lens), 4, 128, 128), dict(lens=lens, seg_len=1024, **ov)))
    jobs.append(("varlen host offsets (CPU cu_seqlens), split", (1, sum(lens), 4, 128, 128),
                 dict(lens=lens, cu_host=True, seg_len=2048)))
    jobs.append(("varlen device offsets, auto plan (H=2: split assumed)",
                 (1, sum(lens), 2, 128, 128), dict(lens=lens)))
    jobs.append(("[fused] D=E=64 T=777 H=3", (1, 777, 3, 64, 64), dict(fused=True)))
    jobs.append(("[fused] fp32 T=1500 H=2 split", (1, 1500, 2, 128, 128),
                 dict(dtype=torch.float32, fused=True, seg_len=512)))
    return jobs


def run_job(job):
    """One check in a worker process: returns (its report line, failed names)."""
    import contextlib
    import io
    torch.cuda.set_device(0)
    name, args, kwargs = job
    buf = io.StringIO()
    n = len(FAILS)
    with contextlib.redirect_stdout(buf):
        try:
            check(name, *args, **kwargs)
        except Exception as exc:
            print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:200]}")
            FAILS.append(name)
    return buf.getvalue().rstrip(), FAILS[n:]


def schedule_checks():
    for name, args, kwargs in schedule_jobs():
        check(name, *args, **kwargs)


def check_bad_slots():
    """Bad slots in a device tensor (not read back): nothing outside the named rows is written,
    the bad rows' outputs are NaN, the CUDA context survives."""
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip the 1M-token checks")
    ap.add_argument("--long-only", action="store_true", help="only the 1M-token checks")
    args = ap.parse_args()
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    if not args.long_only:
        short_checks()
        schedule_checks()
        check_bad_slots()
        check_no_sync_and_graph()
    if not args.quick:
        check_long(1 << 20, 4, grads=False)
        check_long(1 << 20, 2, grads=True)
    print("FAILED: " + ", ".join(FAILS) if FAILS else "all GPU checks passed", flush=True)
    sys.exit(1 if FAILS else 0)


def short_checks():
    t0 = time.time()
    check("bf16 B=2 T=3000 H=4 D=E=128", 2, 3000, 4, 128, 128)
    check("bf16 B=2 T=3000 H=4 D=E=128 split 1024", 2, 3000, 4, 128, 128, seg_len=1024)
    check("bf16 B=1 T=777 H=3 D=E=64", 1, 777, 3, 64, 64)
    check("bf16 B=1 T=1000 H=2 D=E=256 split 256", 1, 1000, 2, 256, 256, seg_len=256)
    check("bf16 B=1 T=1000 H=2 D=128 E=64", 1, 1000, 2, 128, 64)
    check("bf16 B=1 T=1000 H=2 D=64 E=256 split 512", 1, 1000, 2, 64, 256, seg_len=512)
    check("fp16 B=2 T=2049 H=2 D=E=128", 2, 2049, 2, 128, 128, dtype=torch.float16)
    check("fp32 B=1 T=1500 H=2 D=E=128 split 512", 1, 1500, 2, 128, 128,
          dtype=torch.float32, seg_len=512)
    check("bf16 T=1 H=4 D=E=128", 3, 1, 4, 128, 128)
    check("bf16 block 16 / 32 / 128 equal results (16)", 1, 500, 2, 128, 128, block_t=16)
    check("bf16 block 128", 1, 500, 2, 128, 128, block_t=128)
    g = torch.Generator().manual_seed(3)
    lens = [0, 1, 63, 64, 65, 5000, 0, 7, 12000]
    lens += torch.randint(0, 700, (40,), generator=g).tolist()
    check(f"varlen bf16 {len(lens)} docs T={sum(lens)} H=4", 1, sum(lens), 4, 128, 128, lens=lens)
    check(f"varlen bf16 {len(lens)} docs split 1024", 1, sum(lens), 4, 128, 128, lens=lens,
          seg_len=1024)
    check("bf16 H=8 T=65536 (auto split)", 1, 65536, 8, 128, 128, grads=True)
    check_decode()
    print(f"     (short checks {time.time() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
