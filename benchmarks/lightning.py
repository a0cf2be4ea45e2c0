"""Lightning attention speed: our Triton kernels against fla, OpenNLPLab lightning-attn, PyTorch
SDPA (causal softmax, flash and cuDNN) and the roofline floor, on one card in one run.

    python benchmarks/lightning.py            # the table (bf16, B=1, D=E=128)
    python benchmarks/lightning.py --sweep    # also time tile / segment variants of our kernels

Times are medians of triton.testing.do_bench on random inputs. The floor is
max(bytes / copy bandwidth, flops / bf16 matmul rate), both ceilings measured here:
forward moves q, k, v in and o out (1 KiB per token and head in bf16 at D=E=128); the backward
adds do in and dq, dk, dv out; decode reads and writes the fp32 state (2 H D E 4 bytes per
sequence). FLOPs count the chunked algorithm at block 64. Missing peers print n/a."""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
import triton
from triton.testing import do_bench

from minimax01.ops import lightning_attn, lightning_decode
from minimax01.ops.lightning import lightning_slopes, triton_plan

DT = torch.bfloat16
D = E = 128
PREFILL = [(64, 4096), (64, 16384), (64, 65536), (8, 65536)]
DECODE = [1, 64, 256]


def bench(fn, warmup=25, rep=100, grad_to_none=None):
    return do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def ceilings():
    n = 1 << 31
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    bw = 2 * n / (bench(lambda: b.copy_(a)) * 1e-3)
    x = torch.randn(8192, 8192, device="cuda", dtype=DT)
    y = torch.randn_like(x)
    mm = 2 * 8192 ** 3 / (bench(lambda: x @ y) * 1e-3)
    return bw, mm


def floors(h, t, bw, mm):
    """Floor times (ms) for forward and forward+backward at B=1, bf16, D=E=128."""
    tok = t * h
    c = 64
    f_flops = tok * (2 * c * D + 2 * c * E + 4 * D * E)
    f_bytes = tok * (2 * D + 2 * E) * 2
    b_bytes = tok * (2 * D + 2 * E + 2 * D + E) * 2  # read q k v do, write dq dk dv
    fwd = max(f_bytes / bw, f_flops / mm) * 1e3
    both = max((f_bytes + b_bytes) / bw, 3 * f_flops / mm) * 1e3
    return fwd, both


def make(h, t, grad=False):
    g = torch.Generator(device="cuda").manual_seed(h * t)
    q, k = (torch.randn(1, t, h, D, device="cuda", generator=g, dtype=DT) * 0.3 for _ in range(2))
    v = torch.randn(1, t, h, E, device="cuda", generator=g, dtype=DT)
    slope = lightning_slopes(h, 1, 80).cuda()
    if grad:
        for x in (q, k, v):
            x.requires_grad_()
    return q, k, v, slope


def _fwd_bwd(fn, q, k, v, do):
    def run():
        o = fn()
        o.backward(do)
    return run


# ---- peers -------------------------------------------------------------------------------

def ours(q, k, v, slope):
    return lambda: lightning_attn(q, k, v, slope, backend="triton")[0]


def fla_chunk(q, k, v, slope):
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception:
        return None
    g = (-slope).float()
    return lambda: chunk_simple_gla(q, k, v, g_gamma=g, scale=1.0)[0]


def opennlp(q, k, v, slope):
    try:
        from lightning_attn.ops import lightning_attn_func
    except Exception:
        return None
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_(x.requires_grad)
                  for x in (q, k, v))
    s = slope.float().contiguous()
    return lambda: lightning_attn_func(qt, kt, vt, s)


def sdpa(backend_name):
    def peer(q, k, v, slope):
        from torch.nn.attention import SDPBackend, sdpa_kernel
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


PEERS = [("ours", ours), ("fla", fla_chunk), ("lightning-attn", opennlp),
         ("sdpa-flash", sdpa("flash")), ("sdpa-cudnn", sdpa("cudnn"))]


def time_peer(make_fn, h, t, backward):
    q, k, v, slope = make(h, t, grad=backward)
    try:
        fn = make_fn(q, k, v, slope)
        if fn is None:
            return None
        heavy = make_fn.__name__ == "peer" and t >= 65536  # softmax at 64K: few repeats
        kw = dict(warmup=1, rep=1) if heavy else {}
        if backward:
            do = torch.randn_like(fn())
            leaves = [x for x in (q, k, v)]
            return bench(_fwd_bwd(fn, q, k, v, do), grad_to_none=leaves, **kw)
        with torch.no_grad():
            return bench(fn, **kw)
    except Exception as exc:  # a peer that cannot run this shape
        print(f"  [{make_fn.__name__} h={h} t={t} bwd={backward}: {type(exc).__name__}: "
              f"{str(exc)[:120]}]", file=sys.stderr)
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
    return bench(g.replay) / len(fns)


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
            res[name] = graph_per_call([mk(s) for s in states])
        except Exception as exc:
            print(f"  [{name} decode graph: {type(exc).__name__}: {str(exc)[:120]}]",
                  file=sys.stderr)
            res[name] = None
    return res


# ---- sweep of our variants ---------------------------------------------------------------

SWEEP_TILES = [
    dict(block_t=64, block_v=32, num_warps=4, num_stages=3),
    dict(block_t=32, block_v=32, num_warps=4, num_stages=3),
    dict(block_t=32, block_v=32, num_warps=4, num_stages=4),
    dict(block_t=64, block_v=16, num_warps=4, num_stages=3),
    dict(block_t=64, block_v=32, num_warps=4, num_stages=3, bwd_block_v=64),
]
# (heads, tokens, [(name, plan overrides)]): "auto" is the shipped rule
SWEEP_SHAPES = [
    (64, 16384, [("auto", {})]),
    (8, 65536, [("auto", {}), ("1xSM", dict(target_programs=132))]),
]
DECODE_SWEEP = [dict(block_v=32, num_warps=4), dict(block_v=64, num_warps=4),
                dict(block_v=64, num_warps=8), dict(block_v=16, num_warps=2),
                dict(block_v=128, num_warps=8)]


def sweep():
    rows = []
    for tiles in SWEEP_TILES:
        for h, t, splits in SWEEP_SHAPES:
            for split_name, split in splits:
                row = dict(tiles, h=h, t=t, split=split_name)
                with triton_plan.override(**tiles, **split):
                    try:
                        q, k, v, slope = make(h, t, grad=True)
                        fn = ours(q, k, v, slope)
                        with torch.no_grad():
                            row["fwd"] = bench(fn, warmup=10, rep=40)
                        do = torch.randn_like(v)
                        row["f+b"] = bench(_fwd_bwd(fn, q, k, v, do), warmup=10, rep=40,
                                           grad_to_none=[q, k, v])
                    except Exception as exc:
                        row["error"] = f"{type(exc).__name__}: {str(exc)[:80]}"
                rows.append(row)
                print("sweep", json.dumps({k: (round(x, 4) if isinstance(x, float) else x)
                                           for k, x in row.items()}), flush=True)
    return rows


def breakdown(h, t):
    """Per-kernel CUDA time of one forward+backward of ours (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile
    q, k, v, slope = make(h, t, grad=True)
    do = torch.randn_like(v)
    run = _fwd_bwd(ours(q, k, v, slope), q, k, v, do)
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            run()
        torch.cuda.synchronize()
    print(f"breakdown h={h} t={t} (5 fwd+bwd):")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12,
                                    max_name_column_width=60))


def fmt(x):
    return "n/a" if x is None else f"{x:.3f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-table", action="store_true", help="only the ceilings (and the sweep)")
    ap.add_argument("--decode-only", action="store_true", help="table rows for decode only")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    versions = {"torch": torch.__version__, "triton": triton.__version__,
                "card": torch.cuda.get_device_name()}
    try:
        import fla
        versions["fla"] = getattr(fla, "__version__", "?")
    except Exception:
        versions["fla"] = None
    print(versions, flush=True)
    bw, mm = ceilings()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read+write), bf16 matmul {mm / 1e12:.0f} TFLOP/s",
          flush=True)
    out = {"versions": versions, "bw": bw, "mm": mm}
    if args.sweep:
        out["sweep"] = sweep()
        for b in (1, 64, 256):
            for kw in DECODE_SWEEP:
                t_ = decode_times(b, peers=False, **kw)["ours"]
                rate = f"{2 * b * 64 * D * E * 4 / (t_ * 1e-3) / 1e12:.2f} TB/s" if t_ else ""
                print("decode sweep", b, kw, fmt(t_), rate, flush=True)
        for h, t in ((64, 16384),):
            try:
                breakdown(h, t)
            except Exception as exc:
                print("breakdown failed:", exc)
    if args.no_table:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        return

    rows = []
    for backward in ((False, True) if not args.decode_only else ()):
        for h, t in PREFILL:
            fl_f, fl_b = floors(h, t, bw, mm)
            floor = fl_b if backward else fl_f
            r = {"case": f"{'fwd+bwd' if backward else 'fwd'} H={h} T={t // 1024}K",
                 "floor": floor}
            for name, fn in PEERS:
                r[name] = time_peer(fn, h, t, backward)
                print(f"  {r['case']:<22} {name:<15} {fmt(r[name])} ms", flush=True)
            rows.append(r)
    for b in DECODE:
        dt = decode_times(b)
        floor = 2 * b * 64 * D * E * 4 / bw * 1e3
        rows.append({"case": f"decode B={b} H=64", "floor": floor, "ours": dt["ours"],
                     "fla": dt["fla"], "torch": dt["torch"], "eager": dt["ours eager"],
                     "TB/s": 2 * b * 64 * D * E * 4 / (dt["ours"] * 1e-3) / 1e12})
        print(f"  decode B={b}: {dt}", flush=True)
    out["rows"] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)

    print(f"\n{versions['card']}  torch {versions['torch']}  triton {versions['triton']}  "
          f"fla {versions['fla']}  copy {bw / 1e12:.2f} TB/s  bf16 mm {mm / 1e12:.0f} TFLOP/s")
    print("times in ms, B=1, D=E=128, bf16; decode: fp32 state, per layer, CUDA-graph replay")
    cols = ["ours", "fla", "lightning-attn", "sdpa-flash", "sdpa-cudnn", "torch", "floor"]
    print(f"| {'case':<22} | " + " | ".join(f"{c:>14}" for c in cols)
          + " | ours/fla | ours/floor | note |")
    print("|" + "---|" * (len(cols) + 4))
    for r in rows:
        ratio_fla = (r["ours"] / r["fla"]) if r.get("ours") and r.get("fla") else None
        ratio_floor = (r["ours"] / r["floor"]) if r.get("ours") else None
        note = (f"{r['TB/s']:.2f} TB/s; eager {fmt(r['eager'])}" if "TB/s" in r else "")
        print(f"| {r['case']:<22} | " + " | ".join(f"{fmt(r.get(c)):>14}" for c in cols)
              + f" | {fmt(ratio_fla):>8} | {fmt(ratio_floor):>10} | {note} |")


if __name__ == "__main__":
    main()
