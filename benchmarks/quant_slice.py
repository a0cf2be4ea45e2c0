"""8-bit weights on one GPU: an 8-layer slice of MiniMax-Text-01 at its real widths (hidden 6144,
64 x 128 heads, 8 KV heads, 32 experts of 9216, vocab 200,064; 7 lightning + 1 softmax layer),
bf16 against int8 and fp8 (ops/quant, quant/), in one run (< 8 minutes on an H200):

  1. the 8-bit grouped matmul alone against bf16 torch._grouped_mm, at the expert shapes and the
     row counts of decode batch 1 / 16 / 64 (distinct tokens, random top-2 routing) and of an 8K
     prefill: time, weight bytes per second, TFLOP/s; and its error against its torch twin;
  2. per variant, through the serving engine (minimax01.infer.Engine, CUDA-graph decode):
     prefill tokens/s of one 8K prompt; decode at batch 1 / 16 / 64 of DISTINCT sequences (own
     first token, then sampled at temperature 1) at 8K cached tokens: the engine step and the
     captured forward alone, against the bandwidth floor (bytes the step must read: dense weights,
     lm_head, the experts the batch touches (counted), K/V, lightning states read and written;
     divided by the measured copy rate); logits against bf16 (a 4 x 512 forward and one decode
     step through HybridCache): relative error, max |diff|, top-1 agreement.

Goals (issue 15): int8 decode >= 1.6x bf16 at batch 1 and >= 70% of its floor at every batch;
prefill not slower than bf16.

    python benchmarks/quant_slice.py --json quant_slice.json
    # the tile sweep first (quant_sweep.py, < 5 min), its winners then used for the slice:
    python benchmarks/quant_slice.py --sweep --variants bf16,int8 --json quant_slice.json
    # smoke test of the script's logic on a CPU (tiny widths, no timing claims):
    python benchmarks/quant_slice.py --device cpu --tiny
    TRITON_INTERPRET=1 python benchmarks/quant_slice.py --device cpu --tiny --sweep --sweep-limit 2
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from minimax01 import MiniMaxForCausalLM, ModelConfig  # noqa: E402
from minimax01.config import hybrid_layer_types  # noqa: E402
from minimax01.infer.engine import Engine  # noqa: E402
from minimax01.infer.request import SamplingParams  # noqa: E402
from minimax01.model.cache import HybridCache  # noqa: E402
from minimax01.ops import quant as oq  # noqa: E402
from minimax01.ops.quant import grouped as grouped_mod  # noqa: E402
from minimax01.quant import quantize_model  # noqa: E402
from minimax01.quant.modules import _quantize_stacked  # noqa: E402

START = time.time()
GiB = 2 ** 30


def log(msg):
    print(f"[{time.time() - START:6.1f}s] {msg}", flush=True)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def slice_config(tiny: bool) -> ModelConfig:
    if tiny:
        return ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=96,
                           num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, rotary_dim=8, layer_types=hybrid_layer_types(8, 8),
                           num_local_experts=8, num_experts_per_tok=2, block_size=16,
                           rope_theta=10_000.0, dtype="bfloat16")
    return ModelConfig.from_preset("minimax-text-01", num_hidden_layers=8,
                                   layer_types=hybrid_layer_types(8, 8))


def copy_rate(dev) -> float:
    """Read + write bytes per second of a 2 GiB device copy (the bandwidth the floors use)."""
    if dev.type != "cuda":
        return float("nan")
    x = torch.empty(2 * GiB, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync(dev)
    bw = 2 * x.numel() * 10 / (time.perf_counter() - t0)
    del x, y
    torch.cuda.empty_cache()
    return bw


def timed(fn, dev, reps=10, warm=3) -> float:
    """Median seconds of fn() over `reps` runs (CUDA events on a GPU)."""
    for _ in range(warm):
        fn()
    sync(dev)
    if dev.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def routed_counts(tokens: int, experts: int, k: int, dev) -> torch.Tensor:
    """Assignments per expert of `tokens` distinct tokens routed uniformly to top-k experts."""
    g = torch.Generator().manual_seed(tokens)
    choice = torch.rand(tokens, experts, generator=g).topk(k, dim=-1).indices
    return torch.bincount(choice.flatten(), minlength=experts).to(dev)


# ------------------------------------------------------------------------------ 1. kernel alone
def bench_grouped(cfg, dev, args):
    rows = []
    e, h, i, k = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size, cfg.num_experts_per_tok
    g = torch.Generator(device=dev).manual_seed(0)
    cases = [(f"decode b={b}", b) for b in args.batches] + [(f"prefill {args.prefill}", args.prefill)]
    for name, n, kk in (("gate_up", 2 * i, h), ("down", h, i)):
        w = (torch.randn(e, n, kk, device=dev, generator=g) * kk ** -0.5).to(torch.bfloat16)
        variants = {"int8": _quantize_stacked(w, "int8"), "fp8": _quantize_stacked(w, "fp8")}
        for case, tokens in cases:
            counts = routed_counts(tokens, e, k, dev)
            m = int(counts.sum())
            touched = int((counts > 0).sum())
            x = torch.randn(m, kk, device=dev, generator=g).to(torch.bfloat16)
            offs = torch.cumsum(counts, 0).to(torch.int32)
            flops = 2 * m * n * kk
            runs = {}
            if dev.type == "cuda" and hasattr(torch, "_grouped_mm"):
                runs["bf16 _grouped_mm"] = (lambda: torch._grouped_mm(
                    x, w.transpose(-2, -1), offs=offs), touched * n * kk * 2)
            for fmt, (q, s) in variants.items():
                wb = touched * n * (kk * 1 + 4)
                runs[f"{fmt} triton"] = (lambda q=q, s=s: oq.grouped_mm_q(x, q, s, counts,
                                                                          backend="triton"), wb)
                if tokens == args.prefill:  # dequantise to bf16, then torch._grouped_mm
                    runs[f"{fmt} dequant"] = (lambda q=q, s=s: oq.grouped_mm_q(
                        x, q, s, counts, backend="dequant"), wb)
                if fmt == "fp8" and oq.scaled_available(dev) and tokens == args.prefill:
                    runs["fp8 scaled_grouped_mm"] = (lambda q=q, s=s: oq.grouped_mm_q(
                        x, q, s, counts, backend="scaled"), wb)
            for label, (fn, wbytes) in runs.items():
                row = {"matrix": name, "case": case, "rows": m, "experts": touched, "kernel": label}
                try:
                    t = timed(fn, dev, reps=args.reps)
                    row.update(ms=t * 1e3, weight_tb_s=wbytes / t / 1e12, tflops=flops / t / 1e12)
                    if "bf16" not in label:
                        fmt = label.split()[0]
                        q, s = variants[fmt]
                        want = (oq.scaled_twin(x, q, s, counts) if "scaled" in label
                                else oq.grouped_mm_q_torch(x, q, s, counts))
                        row["rel_err_vs_twin"] = rel(fn().float(), want.float())
                    log(f"{name:8} {case:12} {label:22} {row['ms']:8.3f} ms "
                        f"{row['weight_tb_s']:6.2f} TB/s {row['tflops']:7.1f} TFLOP/s"
                        + (f"  err {row['rel_err_vs_twin']:.1e}" if "rel_err_vs_twin" in row else ""))
                except Exception as ex:  # noqa: BLE001 - record and go on
                    row["error"] = f"{type(ex).__name__}: {str(ex)[:300]}"
                    log(f"{name} {case} {label}: {row['error']}")
                rows.append(row)
        del w, variants
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------ 2. the slice
def build(cfg, dev, seed=0):
    torch.manual_seed(seed)
    if dev.type == "cuda":
        torch.cuda.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # never materialise the fp32 slice (190 GB)
    try:
        with torch.device(dev):
            model = MiniMaxForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def weight_bytes(model):
    """Bytes a decode step reads: dense (attention, router, norms), lm_head, one expert (all
    layers)."""
    dense = head = expert = 0
    for name, t in model.state_dict().items():
        n = t.numel() * t.element_size()
        if ".mlp.experts." in name:
            expert += n
        elif name == "lm_head.weight":
            head += n
        elif name != "model.embed_tokens.weight":
            dense += n
    return dense, head, expert // model.config.num_local_experts


@torch.no_grad()
def touched_experts(model, batch, dev) -> float:
    """Mean over layers of the distinct experts `batch` distinct tokens route to."""
    seen = []
    hooks = [layer.mlp.gate.register_forward_hook(
        lambda mod, inp, out: seen.append(int(torch.unique(out.topk(
            model.config.num_experts_per_tok, dim=-1).indices).numel())))
        for layer in model.model.layers]
    ids = torch.randperm(model.config.vocab_size, generator=torch.Generator().manual_seed(batch))
    model(ids[:batch, None].to(dev))
    for h in hooks:
        h.remove()
    return sum(seen) / len(seen)


@torch.no_grad()
def reference_outputs(model, dev, args):
    v = model.config.vocab_size
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(0, v, (4, args.error_tokens), generator=g).to(dev)
    nxt = torch.randint(0, v, (4, 1), generator=g).to(dev)
    fwd = model(ids, logits_to_keep=64).logits
    cache = HybridCache(model.config, 4, args.error_tokens + 1, dev, torch.bfloat16)
    model(ids, cache=cache)
    dec = model(nxt, cache=cache).logits
    return fwd, dec


def compare(out, ref) -> dict:
    res = {}
    for name, a, b in (("forward", out[0], ref[0]), ("decode", out[1], ref[1])):
        res[name] = {"rel": rel(a, b), "max_abs": (a - b).abs().max().item(),
                     "top1": (a.argmax(-1) == b.argmax(-1)).float().mean().item()}
    return res


def prefill_rate(eng, length, vocab, dev) -> float:
    g = torch.Generator().manual_seed(7)
    warm = torch.randint(0, vocab, (min(length, 1024),), generator=g).tolist()
    prompt = torch.randint(0, vocab, (length,), generator=g).tolist()
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    eng.generate([warm], params)
    eng.generate([prompt], params)  # compiles / tunes at this length
    sync(dev)
    t0 = time.perf_counter()
    eng.generate([prompt], params)
    sync(dev)
    return length / (time.perf_counter() - t0)


def decode_times(eng, batch, context, steps, dev) -> tuple[float, float]:
    """(engine step, captured forward alone) seconds with `batch` distinct sequences at
    `context` cached tokens."""
    vocab = eng.config.vocab_size
    firsts = torch.randperm(vocab, generator=torch.Generator().manual_seed(batch))[:batch]
    params = SamplingParams(max_tokens=eng.max_context - 2, temperature=1.0, ignore_eos=True)
    ids = [eng.add_request([int(t)], params) for t in firsts]  # own first token, sampled on
    while eng.scheduler.waiting or any(s.prefilling for s in eng.scheduler.running):
        eng.step()
    seqs = [s for s in eng.scheduler.running if s.request_id in ids]
    for s in seqs:
        s.num_cached = context
    eng.pool.lengths[torch.tensor([s.slot for s in seqs], device=eng.device)] = context
    for _ in range(3):
        eng.step()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    sync(dev)
    step = (time.perf_counter() - t0) / steps
    forward = float("nan")
    if eng.graphs is not None and eng.graphs.graphs:
        graph = eng.graphs.graphs[eng.graphs.bucket(batch)]
        forward = timed(graph.replay, dev, reps=min(steps, 20), warm=1)
    for rid in ids:
        eng.abort(rid)
    eng.step()
    return step, forward


def run_variant(variant, cfg, dev, args, ref, bw):
    log(f"--- {variant}: building the slice")
    model = build(cfg, dev)
    if variant != "bf16":
        t0 = time.perf_counter()
        quantize_model(model, variant, modules=args.modules.split(","))
        sync(dev)
        log(f"quantised to {variant} ({args.modules}) in {time.perf_counter() - t0:.1f}s")
    if dev.type == "cuda":
        log(f"weights on the GPU: {torch.cuda.memory_allocated(dev) / GiB:.1f} GiB")
    out = {"variant": variant}
    outputs = reference_outputs(model, dev, args)
    if ref is None:
        ref = tuple(o.clone() for o in outputs)
    else:
        out["logits_vs_bf16"] = compare(outputs, ref)
        log(f"logits vs bf16: {out['logits_vs_bf16']}")
    dense, head, per_expert = weight_bytes(model)
    touched = {b: touched_experts(model, b, dev) for b in args.batches}
    eng = Engine(model, max_context=args.context + 128, num_slots=max(args.batches),
                 prefill_chunk=args.prefill, cuda_graphs=dev.type == "cuda")
    for t in list(eng.pool.keys.values()) + list(eng.pool.values.values()):
        t.zero_()
    try:
        out["prefill_tok_s"] = prefill_rate(eng, args.prefill, cfg.vocab_size, dev)
        log(f"prefill {args.prefill}: {out['prefill_tok_s']:,.0f} tok/s")
    except Exception as ex:  # noqa: BLE001
        out["prefill_error"] = f"{type(ex).__name__}: {str(ex)[:300]}"
        log(f"prefill: {out['prefill_error']}")
    kv_tok = cfg.kv_cache_bytes_per_token(2)
    state = cfg.lightning_state_bytes()
    out["decode"] = []
    for b in args.batches:
        row = {"batch": b, "context": args.context, "experts_touched": touched[b]}
        need = dense + head + touched[b] * per_expert + b * args.context * kv_tok + 2 * b * state
        row["floor_ms"] = need / bw * 1e3
        try:
            step, fwd = decode_times(eng, b, args.context, args.steps, dev)
            row.update(step_ms=step * 1e3, forward_ms=fwd * 1e3,
                       step_of_floor=row["floor_ms"] / (step * 1e3),
                       forward_of_floor=row["floor_ms"] / (fwd * 1e3))
            log(f"decode b={b:>3}: step {step * 1e3:7.2f} ms, forward {fwd * 1e3:7.2f} ms, floor "
                f"{row['floor_ms']:6.2f} ms ({row['forward_of_floor']:.0%} of it in the forward), "
                f"{touched[b]:.1f} experts/layer")
        except Exception as ex:  # noqa: BLE001
            row["error"] = f"{type(ex).__name__}: {str(ex)[:300]}"
            log(f"decode b={b}: {row['error']}")
        out["decode"].append(row)
    if grouped_mod.scaled_error:
        out["scaled_path_error"] = grouped_mod.scaled_error
    del eng, model
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out, ref


def summary(results) -> str:
    lines = ["", "== decode (8K context, distinct sequences): ms per step (engine) / forward / "
             "floor, and forward as % of floor =="]
    by = {r["variant"]: r for r in results["variants"]}
    base = by.get("bf16")
    for v, r in by.items():
        for d in r.get("decode", []):
            if "step_ms" not in d:
                continue
            speed = ""
            if base and v != "bf16":
                b0 = next((x for x in base["decode"] if x["batch"] == d["batch"] and "step_ms" in x), None)
                if b0:
                    speed = (f"  speed-up vs bf16: step {b0['step_ms'] / d['step_ms']:.2f}x, "
                             f"forward {b0['forward_ms'] / d['forward_ms']:.2f}x")
            lines.append(f"  {v:5} b={d['batch']:>3}: {d['step_ms']:7.2f} / {d['forward_ms']:7.2f} / "
                         f"{d['floor_ms']:6.2f} ms  ({d['forward_of_floor']:.0%}, step "
                         f"{d['step_of_floor']:.0%}){speed}")
    lines.append("== prefill 8K (tok/s) and logits vs bf16 ==")
    for v, r in by.items():
        err = r.get("logits_vs_bf16")
        e = "" if not err else (f"  forward rel {err['forward']['rel']:.2e} top1 "
                                f"{err['forward']['top1']:.3f}; decode rel "
                                f"{err['decode']['rel']:.2e} top1 {err['decode']['top1']:.3f}")
        lines.append(f"  {v:5} {r.get('prefill_tok_s', float('nan')):10,.0f}{e}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="toy widths (a CPU smoke test)")
    p.add_argument("--variants", default="bf16,int8,fp8")
    p.add_argument("--modules", default="experts,attention", help="what 8-bit covers")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--prefill", type=int, default=8192)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--error-tokens", type=int, default=512)
    p.add_argument("--no-kernels", action="store_true", help="skip the grouped-matmul section")
    p.add_argument("--time-budget", type=float, default=420.0,
                   help="seconds; variants not started by then are skipped")
    p.add_argument("--json", default=None)
    p.add_argument("--sweep", action="store_true",
                   help="time every tile config first (quant_sweep.py), print the winners, then "
                        "run the slice with them (the kernel section is skipped)")
    p.add_argument("--sweep-only", action="store_true", help="stop after the sweep")
    p.add_argument("--sweep-budget", type=float, default=240.0, help="seconds for the sweep")
    p.add_argument("--sweep-limit", type=int, default=None,
                   help="only the first N configs of each space (a quick check)")
    p.add_argument("--sweep-no-dense", action="store_true",
                   help="expert matrices only (not the lightning projections)")
    p.add_argument("--sweep-fault", type=json.loads, default=None, help=argparse.SUPPRESS)
    p.add_argument("--winners", default=None,
                   help="the JSON of an earlier --sweep run: use its winners")
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    out_dir = os.environ.get("OUT")
    if args.json is None and out_dir:
        args.json = os.path.join(out_dir, "quant_slice.json")
    dev = torch.device(args.device)
    if args.tiny:
        args.context, args.prefill, args.error_tokens, args.steps, args.reps = 64, 64, 32, 2, 2
    cfg = slice_config(args.tiny)
    info = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "device": str(dev), "command": " ".join(sys.argv)}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    bw = copy_rate(dev)
    if dev.type != "cuda":
        bw = 1e11  # nominal, only so that the CPU smoke test runs
    info["copy_tb_s"] = bw / 1e12
    log(f"{info}")
    results = {"info": info, "kernels": [], "variants": []}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)

    budget_from, report = START, ""
    if args.sweep or args.winners:
        import quant_sweep

        if args.sweep:
            results["sweep"] = quant_sweep.sweep(args, log)
            save()
            report = quant_sweep.report(results["sweep"], info, log)
            print(report, flush=True)
            if out_dir:
                with open(os.path.join(out_dir, "quant_sweep.txt"), "w") as f:
                    f.write(report + "\n")
            budget_from = time.time()
            args.no_kernels = True
        else:
            try:
                with open(args.winners) as f:
                    results["sweep"] = json.load(f)["sweep"]
            except (OSError, ValueError, KeyError) as ex:
                print(f"--winners {args.winners}: not the JSON of a --sweep run "
                      f"({type(ex).__name__}: {ex})", file=sys.stderr)
                return 2
        quant_sweep.install(results["sweep"], dev)
        log(f"using {len(results['sweep']['winners'])} swept configs; DEQUANT_MIN_ROWS = "
            f"{grouped_mod.DEQUANT_MIN_ROWS}")
        if args.sweep_only:
            log("done")
            return 0
    if not args.no_kernels:
        results["kernels"] = bench_grouped(cfg, dev, args)
        save()
    ref = None
    for v in args.variants.split(","):
        if time.time() - budget_from > args.time_budget:
            results["variants"].append({"variant": v, "skipped": "time budget"})
            log(f"{v}: skipped (time budget {args.time_budget:.0f}s)")
            continue
        try:
            out, ref = run_variant(v, cfg, dev, args, ref, bw)
        except Exception as ex:  # noqa: BLE001 - report it, try the next variant
            out = {"variant": v, "error": f"{type(ex).__name__}: {str(ex)[:500]}"}
            log(f"{v}: {out['error']}")
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        results["variants"].append(out)
        save()
    print(summary(results))
    if report:  # again at the end, where a truncated log still shows it
        print(report[report.index("# paste into"):])
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
