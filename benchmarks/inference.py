"""Inference benchmark: the engine's prefill and decode throughput, against transformers'
MiniMaxForCausalLM.generate on the same weights and against an all-softmax variant of the same
model, in one run on one device. Results go to BENCHMARKS.md ("Inference").

    # the recorded run (one H100):
    python benchmarks/inference.py --preset 1b --json out.json
    # a smoke run on CPU at toy sizes:
    python benchmarks/inference.py --preset debug --device cpu --dtype float32 \\
        --prefill 64,256 --decode-contexts 64,256 --decode-batches 1,4 --hf-prefill 64 \\
        --hf-context 64 --hf-batches 1 --softmax-max 256

Prefill: one prompt of L random tokens through the engine (chunked varlen prefill) up to its
first sampled token. Decode: B sequences whose slots hold C tokens, the time of one full engine
step (CUDA-graph forward, sampling, bookkeeping); the cached context is set directly (decode
cost depends on its length only), so a 1M-token context needs no 1M-token prefill per batch.
transformers runs only at short contexts: its MiniMax code loops over lightning blocks in Python."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from minimax01 import ModelConfig, MiniMaxForCausalLM  # noqa: E402
from minimax01.config import FULL  # noqa: E402
from minimax01.infer.engine import Engine, cast_model  # noqa: E402
from minimax01.infer.planner import GiB, plan_memory  # noqa: E402
from minimax01.infer.request import SamplingParams  # noqa: E402

START = time.time()


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def log(msg: str) -> None:
    print(f"[{time.time() - START:7.1f}s] {msg}", flush=True)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(cfg: ModelConfig, device, dtype, seed=0) -> MiniMaxForCausalLM:
    torch.manual_seed(seed)
    with torch.device(device):
        model = MiniMaxForCausalLM(cfg)
    return cast_model(model.eval(), dtype=dtype)


def over_budget(args) -> bool:
    return time.time() - START > args.time_budget


# ------------------------------------------------------------------------------ ours
def engine_for(model, max_context, num_slots, args):
    eng = Engine(model, max_context=max_context, num_slots=num_slots,
                 prefill_chunk=args.prefill_chunk, cuda_graphs=not args.no_graphs)
    for k in eng.pool.keys.values():  # defined values for the synthetic contexts
        k.zero_()
    for v in eng.pool.values.values():
        v.zero_()
    return eng


def prefill_time(eng, length, vocab, device) -> float:
    prompt = torch.randint(0, vocab, (length,)).tolist()
    sync(device)
    t0 = time.perf_counter()
    eng.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    sync(device)
    return time.perf_counter() - t0


def bench_prefill(model, lengths, args, device, label):
    rows = []
    vocab = model.config.vocab_size
    for length in lengths:
        if over_budget(args):
            rows.append({"model": label, "tokens": length, "skipped": "time budget"})
            continue
        try:
            eng = engine_for(model, length + 8, 1, args)
            prefill_time(eng, min(length, args.prefill_chunk + 17), vocab, device)  # warm-up
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t = prefill_time(eng, length, vocab, device)
            peak = torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else 0
            rows.append({"model": label, "tokens": length, "seconds": t,
                         "tokens_per_s": length / t, "peak_gib": peak})
            log(f"prefill {label} {length:>8}: {t:8.3f}s  {length / t:12,.0f} tok/s  "
                f"peak {peak:.1f} GiB")
        except Exception as e:  # noqa: BLE001 - record it, go on with the other cases
            rows.append({"model": label, "tokens": length, "skipped": f"{type(e).__name__}"})
            log(f"prefill {label} {length}: {type(e).__name__}: {str(e)[:300]}")
        finally:
            eng = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def decode_step_time(eng, batch, context, steps, device, keep=False) -> float:
    """Seconds per engine step with `batch` sequences decoding at `context` cached tokens
    (keep=True leaves them running)."""
    params = SamplingParams(max_tokens=eng.max_context - 1, temperature=0.0, ignore_eos=True)
    ids = [eng.add_request([1], params) for _ in range(batch)]
    while any(s.prefilling for s in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()
    seqs = [s for s in eng.scheduler.running if s.request_id in ids]
    for s in seqs:  # the synthetic context: the slot holds `context` tokens
        s.num_cached = context
    eng.pool.lengths[torch.tensor([s.slot for s in seqs], device=eng.device)] = context
    for _ in range(3):  # warm-up (captures this batch's CUDA graph)
        eng.step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    sync(device)
    dt = (time.perf_counter() - t0) / steps
    if not keep:
        for rid in ids:
            eng.abort(rid)
        eng.step()
    return dt


def bench_decode(model, contexts, batches, args, device, label):
    rows = []
    cfg = model.config
    dtype_name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(
        next(model.parameters()).dtype, "float32")
    for context in contexts:
        if over_budget(args):
            rows += [{"model": label, "context": context, "batch": b, "skipped": "time budget"}
                     for b in batches]
            continue
        max_context = context + 64
        fit = max(batches)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            free, _ = torch.cuda.mem_get_info(device)
            try:
                fit = plan_memory(cfg, free, max_context, dtype=dtype_name,
                                  prefill_chunk=256, max_slots=max(batches)).num_slots
            except ValueError:
                fit = 0
        todo = [b for b in batches if b <= fit]
        rows += [{"model": label, "context": context, "batch": b, "skipped": "does not fit"}
                 for b in batches if b > fit]
        if not todo:
            continue
        try:
            eng = engine_for(model, max_context, max(todo), args)
        except Exception as e:  # noqa: BLE001
            log(f"decode {label} ctx {context}: {type(e).__name__}: {str(e)[:300]}")
            rows += [{"model": label, "context": context, "batch": b,
                      "skipped": type(e).__name__} for b in todo]
            continue
        for b in todo:
            if over_budget(args):
                rows.append({"model": label, "context": context, "batch": b,
                             "skipped": "time budget"})
                continue
            try:
                dt = decode_step_time(eng, b, context, args.decode_steps, device)
            except Exception as e:  # noqa: BLE001
                rows.append({"model": label, "context": context, "batch": b,
                             "skipped": type(e).__name__})
                log(f"decode {label} ctx {context} batch {b}: {type(e).__name__}: {str(e)[:300]}")
                eng = engine_for(model, max_context, max(todo), args)
                continue
            rows.append({"model": label, "context": context, "batch": b, "step_ms": dt * 1e3,
                         "tokens_per_s": b / dt})
            log(f"decode  {label} ctx {context:>8} batch {b:>4}: {dt * 1e3:8.2f} ms/step "
                f"{b / dt:10,.0f} tok/s")
        eng = None
    return rows


# ------------------------------------------------------------------------------ overlap
def bench_overlap(model, args, device):
    """Steps where a long prompt prefills while a batch decodes, with the prefill on its own
    stream (overlap) or on the decode's stream, against each part alone."""
    rows = []
    vocab = model.config.vocab_size
    b, ctx, chunk = args.overlap_batch, args.overlap_context, args.prefill_chunk
    plen = args.overlap_chunks * chunk
    prompt = torch.randint(0, vocab, (plen,)).tolist()
    for overlap in (False, True):
        if over_budget(args):
            break
        eng = Engine(model, max_context=max(plen, ctx) + 64, num_slots=b + 1,
                     prefill_chunk=chunk, overlap=overlap)
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        eng.generate([prompt[:chunk + 3]], params)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        eng.generate([prompt], params)
        sync(device)
        prefill_alone = (time.perf_counter() - t0) / args.overlap_chunks
        decode = decode_step_time(eng, b, ctx, args.decode_steps, device, keep=True)
        eng.add_request(prompt, params)
        steps = 0
        sync(device)
        t0 = time.perf_counter()
        while eng.scheduler.waiting or any(s.prefilling for s in eng.scheduler.running):
            eng.step()
            steps += 1
        sync(device)
        mixed = (time.perf_counter() - t0) / steps
        rows.append({"overlap": overlap, "decode_batch": b, "decode_context": ctx,
                     "prefill_chunk": chunk, "decode_ms": decode * 1e3,
                     "prefill_chunk_ms": prefill_alone * 1e3, "mixed_step_ms": mixed * 1e3})
        log(f"overlap={overlap}: decode {decode * 1e3:.2f} ms + prefill chunk "
            f"{prefill_alone * 1e3:.2f} ms alone; together {mixed * 1e3:.2f} ms/step")
        eng = None
    return rows


# ------------------------------------------------------------------------------ transformers
def hf_model(ours: MiniMaxForCausalLM, device, dtype):
    import transformers

    hf_cfg = dict(ours.config.to_hf_config("hf"))
    for k in ("architectures", "model_type", "transformers_version"):
        hf_cfg.pop(k, None)
    config = transformers.MiniMaxConfig(**hf_cfg)
    with torch.device(device):
        model = transformers.MiniMaxForCausalLM(config)
    missing, unexpected = model.load_state_dict(ours.state_dict(), strict=False)
    missing = [m for m in missing if "decay" not in m and "slope" not in m]
    if missing or unexpected:
        log(f"transformers weights: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model.to(dtype).eval(), transformers.__version__


@torch.inference_mode()
def bench_hf(ours, args, device, dtype):
    rows = []
    try:
        model, version = hf_model(ours, device, dtype)
    except Exception as e:  # noqa: BLE001 - report, keep the rest of the run
        log(f"transformers unavailable: {type(e).__name__}: {e}")
        return rows, None
    vocab = ours.config.vocab_size
    model(torch.randint(0, vocab, (1, 64), device=device))  # warm-up
    for length in args.hf_prefill:
        if over_budget(args):
            break
        ids = torch.randint(0, vocab, (1, length), device=device)
        model(ids, use_cache=False, logits_to_keep=1)  # warm-up at this length
        sync(device)
        t0 = time.perf_counter()
        model(ids, use_cache=False, logits_to_keep=1)
        sync(device)
        t = time.perf_counter() - t0
        rows.append({"model": "transformers", "tokens": length, "seconds": t,
                     "tokens_per_s": length / t})
        log(f"prefill transformers {length:>8}: {t:8.3f}s  {length / t:12,.0f} tok/s")
    n_new = args.hf_new_tokens
    for b in args.hf_batches:
        if over_budget(args):
            break
        ids = torch.randint(0, vocab, (b, args.hf_context), device=device)
        mask = torch.ones_like(ids)
        kw = dict(do_sample=False, attention_mask=mask, pad_token_id=0)
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        sync(device)
        t1 = time.perf_counter()
        model.generate(ids, max_new_tokens=n_new + 1, min_new_tokens=n_new + 1, **kw)
        sync(device)
        t2 = time.perf_counter()
        dt = ((t2 - t1) - (t1 - t0)) / n_new
        rows.append({"model": "transformers", "context": args.hf_context, "batch": b,
                     "step_ms": dt * 1e3, "tokens_per_s": b / dt})
        log(f"decode  transformers ctx {args.hf_context:>8} batch {b:>4}: {dt * 1e3:8.2f} "
            f"ms/step {b / dt:10,.0f} tok/s")
    return rows, version


# ------------------------------------------------------------------------------ ceilings
def ceilings(device):
    """Measured copy bandwidth (read + write bytes / s) and bf16 matmul rate."""
    if device.type != "cuda":
        return None, None
    x = torch.empty(2 * GiB, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync(device)
    bw = 2 * x.numel() * 10 / (time.perf_counter() - t0)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    sync(device)
    flops = 2 * 8192 ** 3 * 10 / (time.perf_counter() - t0)
    del x, y, a
    torch.cuda.empty_cache()
    return bw, flops


def decode_floor_ms(cfg, batch, context, bw, dtype_bytes=2) -> float:
    """Bytes one decode step must move / bandwidth: active weights (top-k experts of every
    layer, or all experts once the batch touches them), K/V of the context, lightning states
    read and written."""
    e, k = cfg.num_local_experts, cfg.num_experts_per_tok
    experts_touched = min(e, batch * k)
    dense = cfg.num_parameters(active=True, embeddings=False) \
        - cfg.num_hidden_layers * k * 3 * cfg.hidden_size * cfg.intermediate_size
    expert = cfg.num_hidden_layers * experts_touched * 3 * cfg.hidden_size * cfg.intermediate_size
    weights = (dense + expert + cfg.vocab_size * cfg.hidden_size) * dtype_bytes
    kv = batch * context * cfg.kv_cache_bytes_per_token(dtype_bytes)
    states = 2 * batch * cfg.lightning_state_bytes()
    return (weights + kv + states) / bw * 1e3


# ------------------------------------------------------------------------------ main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="1b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prefill", type=ints, default=ints("8192,32768,131072,1048576"))
    p.add_argument("--prefill-chunk", type=int, default=32768)
    p.add_argument("--decode-contexts", type=ints, default=ints("8192,32768,131072,1048576"))
    p.add_argument("--decode-batches", type=ints, default=ints("1,4,16,64,256"))
    p.add_argument("--decode-steps", type=int, default=20)
    p.add_argument("--softmax-max", type=int, default=131072,
                   help="longest context run for the all-softmax variant (0: skip it)")
    p.add_argument("--hf-prefill", type=ints, default=ints("2048,8192"))
    p.add_argument("--hf-context", type=int, default=2048)
    p.add_argument("--hf-batches", type=ints, default=ints("1,16,64"))
    p.add_argument("--hf-new-tokens", type=int, default=16)
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--overlap-batch", type=int, default=64,
                   help="decode batch of the prefill/decode overlap case (0: skip it)")
    p.add_argument("--overlap-context", type=int, default=8192)
    p.add_argument("--overlap-chunks", type=int, default=4)
    p.add_argument("--no-graphs", action="store_true")
    p.add_argument("--time-budget", type=float, default=1e9, help="seconds; later cases skip")
    p.add_argument("--json", default=None, help="write all results here")
    args = p.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cfg = ModelConfig.from_preset(args.preset)
    info = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "preset": args.preset, "dtype": args.dtype, "device": str(device),
            "command": " ".join(sys.argv)}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    bw, mm = ceilings(device)
    info["copy_bandwidth_tb_s"] = bw and bw / 1e12
    info["matmul_tflops"] = mm and mm / 1e12
    log(f"{info}")
    results = {"info": info, "prefill": [], "decode": []}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)

    model = build(cfg, device, dtype)
    hf_ctx = [args.hf_context] if not args.no_hf and args.hf_context not in args.decode_contexts \
        else []
    results["prefill"] += bench_prefill(model, sorted(set(args.prefill + args.hf_prefill)), args,
                                        device, "minimax01")
    save()
    results["decode"] += bench_decode(model, sorted(set(args.decode_contexts + hf_ctx)),
                                      args.decode_batches, args, device, "minimax01")
    save()
    if args.overlap_batch:
        try:
            results["overlap"] = bench_overlap(model, args, device)
        except Exception as e:  # noqa: BLE001
            log(f"overlap case failed: {type(e).__name__}: {str(e)[:300]}")
        save()
    if not args.no_hf:
        rows, version = bench_hf(model, args, device, dtype)
        info["transformers"] = version
        results["prefill"] += [r for r in rows if "tokens" in r]
        results["decode"] += [r for r in rows if "context" in r]
        save()
    model = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if args.softmax_max:
        soft_cfg = cfg.replace(layer_types=[FULL] * cfg.num_hidden_layers)
        soft = build(soft_cfg, device, dtype)
        results["prefill"] += bench_prefill(
            soft, [n for n in sorted(set(args.prefill + args.hf_prefill)) if n <= args.softmax_max],
            args, device, "all-softmax")
        save()
        results["decode"] += bench_decode(soft, sorted(set(args.decode_contexts + hf_ctx)),
                                          args.decode_batches, args, device, "all-softmax")
        save()
        soft = None
    if bw:
        for r in results["decode"]:
            if "step_ms" in r and r["model"] == "minimax01":
                r["floor_ms"] = decode_floor_ms(cfg, r["batch"], r["context"], bw)
        for r in results["prefill"]:
            if "seconds" in r and r["model"] == "minimax01":
                r["floor_s"] = cfg.flops_per_token(r["tokens"]) * r["tokens"] / mm
    save()
    print_tables(results)
    return 0


def print_tables(results) -> None:
    print("\nprefill (one prompt, time to first token)")
    print("| model | tokens | seconds | tokens/s | floor s (FLOPs / matmul rate) |")
    print("|---|---:|---:|---:|---:|")
    for r in results["prefill"]:
        if "skipped" in r:
            print(f"| {r['model']} | {r['tokens']:,} | {r['skipped']} | | |")
        else:
            floor = f"{r['floor_s']:.3f}" if "floor_s" in r else ""
            print(f"| {r['model']} | {r['tokens']:,} | {r['seconds']:.3f} | "
                  f"{r['tokens_per_s']:,.0f} | {floor} |")
    print("\ndecode (one engine step for the whole batch)")
    print("| model | context | batch | ms/step | tokens/s | floor ms (bytes / bandwidth) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results["decode"]:
        if "skipped" in r:
            print(f"| {r['model']} | {r['context']:,} | {r['batch']} | {r['skipped']} | | |")
        else:
            floor = f"{r['floor_ms']:.2f}" if "floor_ms" in r else ""
            print(f"| {r['model']} | {r['context']:,} | {r['batch']} | {r['step_ms']:.2f} | "
                  f"{r['tokens_per_s']:,.0f} | {floor} |")
    by = {(r["model"], r.get("context"), r.get("batch")): r for r in results["decode"]
          if "step_ms" in r}
    pre = {(r["model"], r["tokens"]): r for r in results["prefill"] if "seconds" in r}
    print("\nratios")
    for (m, c, b), r in sorted(by.items(), key=lambda x: str(x[0])):
        if m == "transformers" and ("minimax01", c, b) in by:
            print(f"decode ctx {c} batch {b}: minimax01 / transformers = "
                  f"{by[('minimax01', c, b)]['tokens_per_s'] / r['tokens_per_s']:.1f}x")
    for (m, n), r in sorted(pre.items(), key=lambda x: str(x[0])):
        if m == "transformers" and ("minimax01", n) in pre:
            print(f"prefill {n}: minimax01 / transformers = "
                  f"{pre[('minimax01', n)]['tokens_per_s'] / r['tokens_per_s']:.1f}x")
    for r in results.get("overlap", []):
        print(f"overlap={r['overlap']}: decode {r['decode_ms']:.2f} ms (batch "
              f"{r['decode_batch']}) + prefill chunk {r['prefill_chunk_ms']:.2f} ms "
              f"({r['prefill_chunk']} tokens) alone; together {r['mixed_step_ms']:.2f} ms/step")
    ctxs = sorted({c for (m, c, b) in by if m == "minimax01"})
    if len(ctxs) > 1:
        lo, hi = ctxs[0], ctxs[-1]
        for b in sorted({b for (m, c, b) in by if m == "minimax01"}):
            if ("minimax01", lo, b) in by and ("minimax01", hi, b) in by:
                ratio = by[("minimax01", hi, b)]["step_ms"] / by[("minimax01", lo, b)]["step_ms"]
                print(f"decode step time ctx {hi} / ctx {lo} at batch {b}: {ratio:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
