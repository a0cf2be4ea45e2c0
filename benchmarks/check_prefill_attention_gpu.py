"""The softmax side of chunked prefill on the GPU (issue 13): FlashAttention varlen over the
gathered cache (ops/prefill_attention) against the Triton slot kernel and the FLOP floor.

  (a) correctness, bf16, GQA 16/4, D = 128: the flash path against the torch twin
      (torch_slot_attention / torch_paged_attention) on the slot and the paged layout, chunks
      continuing a cached prefix (qlen < ctx + qlen), and far from a top-left-aligned causal mask;
  (b) one layer's op at the `1b` shapes (H = 16, Hkv = 4, D = 128): a chunk of 8192 / 32768
      queries after 64K / 256K / 1M cached tokens, the Triton kernel vs flash (index + gather +
      varlen_attn) vs the FLOP floor 4 * H * D * (visible keys summed over queries) / 750e12;
  (c) end to end: the `1b` engine (random weights, bf16, max_num_batched_tokens 32768) prefilling
      one prompt of 262144 and 1048576 tokens, time to first token, flash vs Triton prefill,
      against the floor ModelConfig.flops_per_token * tokens / matmul rate (as
      benchmarks/inference.py: the measured rate, and 750e12).

    python benchmarks/check_prefill_attention_gpu.py          # one H200: < 3 minutes
    python benchmarks/check_prefill_attention_gpu.py --tiny   # CPU smoke run (torch stand-ins)

Prints every number; exits 1 on a mismatch; writes check_prefill_attention_gpu.json to $OUT."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from inference import build, ceilings, prefill_time  # noqa: E402
from minimax01 import ModelConfig  # noqa: E402
from minimax01.infer import slot_cache  # noqa: E402
from minimax01.infer.engine import Engine  # noqa: E402
from minimax01.infer.pool import PagePool  # noqa: E402
from minimax01.ops import prefill_attention as pa  # noqa: E402
from minimax01.ops.paged_attention import (torch_paged_attention,  # noqa: E402
                                           triton_paged_attention, write_kv)
from minimax01.ops.slot_attention import (torch_slot_attention,  # noqa: E402
                                          triton_slot_attention, work_list)

START = time.time()
FAILED: list[str] = []
PEAK = 750e12  # the FLOP floor's matmul rate (the issue's)


def log(msg: str) -> None:
    print(f"[{time.time() - START:6.1f}s] {msg}", flush=True)


def check(name: str, ok: bool, detail: str) -> None:
    log(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
    if not ok:
        FAILED.append(name)


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev, reps: int) -> float:
    """Median ms of `reps` calls after one warm-up call."""
    fn()
    sync(dev)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def use_torch_stand_in() -> None:
    """--tiny on the CPU: varlen_attn -> its torch stand-in, so the flash wiring runs there."""
    pa.VARLEN = (pa.torch_varlen_attn, {"window_size": (-1, 0)}, False)
    slot_cache.flash_supported = lambda q, k: True


def max_err(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


# ------------------------------------------------------------------------------ (a)
def check_correctness(dev, dtype, h, hkv, d, tiny):
    g = torch.Generator().manual_seed(0)
    tol = 2e-2 if dtype != torch.float32 else 1e-5
    s, length = 3, 4096 if not tiny else 128
    keys = torch.randn(s, hkv, length, d, generator=g).to(dev, dtype)
    values = torch.randn(s, hkv, length, d, generator=g).to(dev, dtype)
    slot = [2, 0, 1]
    ctx, qlen = ([0, 3000, 1500], [700, 96, 333]) if not tiny else ([0, 90, 37], [21, 5, 40])
    q = torch.randn(sum(qlen), h, d, generator=g).to(dev, dtype)
    ref = torch_slot_attention(q, keys, values, slot, ctx, qlen, d ** -0.5)
    modes = [None] + ([True] if pa.VARLEN is not None and pa.VARLEN[2] else [])
    for repeat in modes:
        p = pa.plan(ctx, qlen, h, hkv, dev, slot=torch.tensor(slot, device=dev),
                    repeat_heads=repeat)
        out = pa.prefill_attention(q, keys, values, p, d ** -0.5)
        label = "repeated heads" if p.heads is not None else "enable_gqa"
        err = max_err(out, ref)
        check(f"slot flash vs torch twin ({label})", err <= tol, f"max err {err:.3g} (tol {tol})")
    k, v = pa.gather_kv(keys, values, p.rows, p.cols)
    top_left = pa.torch_varlen_attn(q, k, v, p.cu_q, p.cu_k, p.max_q, p.max_k, scale=d ** -0.5,
                                    enable_gqa=True, bottom_right=False)
    err = max_err(out, top_left)
    check("flash is not top-left aligned", err > 0.1, f"max diff to top-left {err:.3g} (> 0.1)")
    # paged: interleaved pages, a shared prefix page run in every block table
    ps, shared = (16, 2) if not tiny else (4, 2)
    pctx, pqlen = ([2048, 3000, 17], [700, 96, 300]) if not tiny else ([40, 70, 9], [20, 5, 30])
    lengths = [c + n for c, n in zip(pctx, pqlen)]
    pool = PagePool(sum(lengths) // ps + 4 * len(lengths) + shared + 4, ps)
    kp = torch.randn(pool.num_pages, hkv, ps, d, generator=g).to(dev, dtype)
    vp = torch.randn(pool.num_pages, hkv, ps, d, generator=g).to(dev, dtype)
    pool.allocate("prefix", shared * ps)
    for n, length in enumerate(lengths):
        pool.allocate(n, shared * ps, prefix=pool.pages("prefix"))
    for step in range(1, 9):  # grow in turns: the documents' pages interleave
        for n, length in enumerate(lengths):
            pool.extend(n, max(shared * ps, length * step // 8))
    for n, length in enumerate(lengths):
        kn = torch.randn(length - shared * ps, hkv, d, generator=g).to(dev, dtype)
        write_kv(kp, vp, kn, kn.flip(0), pool.slot_mapping(n, shared * ps, length))
    table = pool.block_table(range(3), width=max(map(pool.pages_needed, lengths)) + 1).to(dev)
    pq = torch.randn(sum(pqlen), h, d, generator=g).to(dev, dtype)
    ref = torch_paged_attention(pq, kp, vp, table, pctx, pqlen, d ** -0.5)
    p = pa.plan(pctx, pqlen, h, hkv, dev, block_table=table, page_size=ps)
    err = max_err(pa.prefill_attention(pq, kp, vp, p, d ** -0.5), ref)
    check("paged flash vs torch twin", err <= tol, f"max err {err:.3g} (tol {tol})")
    if dev.type == "cuda":
        check_no_sync(dev, q, keys, values, slot, ctx, qlen, h, hkv, d)
    if dev.type == "cuda" and pa.VARLEN is not None and not pa.VARLEN[2]:
        # information only: does this torch's varlen_attn take Hkv < H K/V as it is?
        p1 = pa.plan(ctx, qlen, h, hkv, dev, slot=torch.tensor(slot, device=dev),
                     repeat_heads=False)
        k1, v1 = pa.gather_kv(keys, values, p1.rows, p1.cols)
        fn, causal, _ = pa.VARLEN
        try:
            o1 = fn(q, k1, v1, p1.cu_q, p1.cu_k, p1.max_q, p1.max_k, scale=d ** -0.5, **causal)
            ref = torch_slot_attention(q, keys, values, slot, ctx, qlen, d ** -0.5)
            log(f"info: varlen_attn with Hkv={hkv} K/V and no enable_gqa: max err "
                f"{max_err(o1, ref):.3g}")
        except Exception as e:  # noqa: BLE001 - information only
            log(f"info: varlen_attn refuses Hkv < H without enable_gqa: {type(e).__name__}")


def check_no_sync(dev, q, keys, values, slot, ctx, qlen, h, hkv, d):
    """The step record's form (cu_q, kv_len already on the device): plan + gather must not
    synchronise (torch's sync debug mode raises if they do); varlen_attn itself: reported."""
    i32 = dict(dtype=torch.int32, device=dev)
    cu_q = torch.tensor([0, *qlen], **i32).cumsum(0, dtype=torch.int32)
    kv_len = torch.tensor(ctx, **i32) + torch.tensor(qlen, **i32)
    slot_t = torch.tensor(slot, device=dev)
    sync(dev)
    for name, part in (("plan + gather", "ours"), ("varlen_attn", "torch")):
        torch.cuda.set_sync_debug_mode("error")
        try:
            p = pa.plan(ctx, qlen, h, hkv, dev, slot=slot_t, cu_q=cu_q, kv_len=kv_len)
            k, v = pa.gather_kv(keys, values, p.rows, p.cols, p.heads)
            if part == "torch":
                pa.flash_prefill_attention(q, k, v, p, d ** -0.5)
            err = None
        except RuntimeError as e:
            err = str(e).splitlines()[0][:200]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        if part == "ours":
            check(f"{name} without a host sync", err is None, err or "no sync")
        else:
            log(f"info: {name} {'synchronises: ' + err if err else 'runs without a host sync'}")


# ------------------------------------------------------------------------------ (b)
def attention_flops(ctx: int, qlen: int, h: int, d: int) -> float:
    """4 H D x the keys the chunk's queries see: qlen * ctx + qlen (qlen + 1) / 2."""
    return 4 * h * d * (qlen * ctx + qlen * (qlen + 1) / 2)


def bench_ops(dev, dtype, h, hkv, d, chunks, contexts, reps):
    rows = []
    g = h // hkv
    block_m = max(1, (128 if dev.type == "cuda" else 64) // g)  # SlotCache._prefill_block_m
    for ctx in contexts:
        length = ctx + max(chunks)
        keys = torch.randn(1, hkv, length, d, device=dev, dtype=dtype)
        values = torch.randn_like(keys)
        for qlen in chunks:
            q = torch.randn(qlen, h, d, device=dev, dtype=dtype)
            i32 = dict(dtype=torch.int32, device=dev)
            slot, c, n = (torch.tensor([x], **i32) for x in (0, ctx, qlen))
            work = work_list([qlen], block_m, dev)
            flops = attention_flops(ctx, qlen, h, d)
            row = dict(ctx=ctx, qlen=qlen, floor_ms=flops / PEAK * 1e3)
            if dev.type == "cuda":
                row["triton_ms"] = timed(lambda: triton_slot_attention(
                    q, keys, values, slot, c, n, d ** -0.5, work=work, block_m=block_m), dev, reps)
            else:
                row["torch_ms"] = timed(lambda: torch_slot_attention(
                    q, keys, values, [0], [ctx], [qlen], d ** -0.5), dev, reps)

            def flash():
                p = pa.plan([ctx], [qlen], h, hkv, dev, slot=slot)
                return pa.prefill_attention(q, keys, values, p, d ** -0.5)

            p = pa.plan([ctx], [qlen], h, hkv, dev, slot=slot)
            row["flash_ms"] = timed(flash, dev, reps)
            row["gather_ms"] = timed(lambda: pa.gather_kv(keys, values, p.rows, p.cols, p.heads),
                                     dev, reps)
            if dev.type == "cuda":
                row["cudnn_split_ms"] = cudnn_split_ms(q, p, keys, values, ctx, reps)
            base = row.get("triton_ms", row.get("torch_ms"))
            row["flash_tflops"] = flops / row["flash_ms"] / 1e9
            row["base_tflops"] = flops / base / 1e9
            log(f"op ctx {ctx:>8} qlen {qlen:>6}: {'triton' if dev.type == 'cuda' else 'torch'} "
                f"{base:9.2f} ms ({row['base_tflops']:6.1f} TFLOP/s)  flash {row['flash_ms']:9.2f}"
                f" ms ({row['flash_tflops']:6.1f} TFLOP/s, gather {row['gather_ms']:.2f})  floor "
                f"{row['floor_ms']:8.2f} ms  flash/floor {row['flash_ms'] / row['floor_ms']:.2f}")
            if row.get("cudnn_split_ms"):
                log(f"info: cuDNN SDPA split (non-causal over the {ctx} cached keys + causal "
                    f"square, no merge) {row['cudnn_split_ms']:.2f} ms "
                    f"({flops / row['cudnn_split_ms'] / 1e9:.1f} TFLOP/s)")
            rows.append(row)
            del q
        del keys, values
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    # the paged layout at one shape: same op, block-table gather
    ctx, qlen, ps = contexts[-1], chunks[-1], 16
    pages = (ctx + qlen) // ps + 2
    kp = torch.randn(pages, hkv, ps, d, device=dev, dtype=dtype)
    vp = torch.randn_like(kp)
    table = torch.randperm(pages - 1, device=dev)[None].to(torch.int32) + 1
    q = torch.randn(qlen, h, d, device=dev, dtype=dtype)
    i32 = dict(dtype=torch.int32, device=dev)
    c, n = torch.tensor([ctx], **i32), torch.tensor([qlen], **i32)
    row = dict(layout="paged", ctx=ctx, qlen=qlen,
               floor_ms=attention_flops(ctx, qlen, h, d) / PEAK * 1e3)
    if dev.type == "cuda":
        work = work_list([qlen], block_m, dev)
        row["triton_ms"] = timed(lambda: triton_paged_attention(
            q, kp, vp, table, c, n, d ** -0.5, work=work, block_m=block_m), dev, reps)
    row["flash_ms"] = timed(lambda: pa.prefill_attention(
        q, kp, vp, pa.plan([ctx], [qlen], h, hkv, dev, block_table=table, page_size=ps),
        d ** -0.5), dev, reps)
    log(f"op paged ctx {ctx} qlen {qlen}: triton {row.get('triton_ms', float('nan')):.2f} ms  "
        f"flash {row['flash_ms']:.2f} ms  floor {row['floor_ms']:.2f} ms")
    rows.append(row)
    return rows


def cudnn_split_ms(q, p, keys, values, ctx, reps):
    """Information for the next step: the chunk's attention as cuDNN SDPA in two calls (all
    queries over the ctx cached keys, no mask; causal over the chunk's own keys, where top-left
    is bottom-right), timed without the LSE merge they would need. None if cuDNN refuses."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    k, v = pa.gather_kv(keys, values, p.rows, p.cols, p.heads)
    h = q.shape[1]
    if k.shape[1] != h:
        k, v = k.repeat_interleave(h // k.shape[1], 1), v.repeat_interleave(h // k.shape[1], 1)
    qt = q.transpose(0, 1)[None]
    kc, vc = k[:ctx].transpose(0, 1)[None], v[:ctx].transpose(0, 1)[None]
    ks, vs = k[ctx:].transpose(0, 1)[None], v[ctx:].transpose(0, 1)[None]

    def run():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            F.scaled_dot_product_attention(qt, kc, vc)
            F.scaled_dot_product_attention(qt, ks, vs, is_causal=True)

    try:
        return timed(run, q.device, reps)
    except RuntimeError as e:
        log(f"info: cuDNN SDPA refused: {str(e).splitlines()[0][:160]}")
        return None


# ------------------------------------------------------------------------------ (c)
def bench_engine(args, dev, dtype, mm_rate):
    cfg = ModelConfig.from_preset(args.preset)
    model = build(cfg, dev, dtype)
    longest = max(args.prompts)
    eng = Engine(model, max_context=longest + 8, num_slots=1, max_num_batched_tokens=args.chunk,
                 cuda_graphs=False, prefix_cache=False)
    rows = []
    backends = [("flash", True), ("triton" if dev.type == "cuda" else "torch", False)]
    for name, flash in backends:
        eng.cache.prefill_flash = flash
        prefill_time(eng, min(longest, args.chunk + 17), cfg.vocab_size, dev)  # warm-up
        for length in args.prompts:
            t = prefill_time(eng, length, cfg.vocab_size, dev)
            fl = cfg.flops_per_token(length) * length
            row = dict(backend=name, tokens=length, seconds=t, floor_s=fl / mm_rate,
                       floor750_s=fl / PEAK)
            log(f"engine {name:>6} {length:>8} tokens: TTFT {t:8.3f} s  floor {row['floor_s']:.3f}"
                f" s (measured rate) / {row['floor750_s']:.3f} s (750 TFLOP/s)  "
                f"x{t / row['floor_s']:.2f} / x{t / row['floor750_s']:.2f}")
            rows.append(row)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run at toy sizes")
    p.add_argument("--preset", default="1b")
    p.add_argument("--chunks", default="8192,32768")
    p.add_argument("--contexts", default="65536,262144,1048576")
    p.add_argument("--prompts", default="262144,1048576")
    p.add_argument("--chunk", type=int, default=32768, help="max_num_batched_tokens")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--skip-engine", action="store_true")
    args = p.parse_args()
    if args.tiny:
        dev, dtype = torch.device("cpu"), torch.float32
        args.preset, args.chunks, args.contexts, args.prompts = "debug", "16,32", "64,128", "96,200"
        args.chunk, args.reps = 32, 1
        use_torch_stand_in()
    else:
        dev, dtype = torch.device("cuda"), torch.bfloat16
    args.prompts = [int(x) for x in args.prompts.split(",")]
    chunks = [int(x) for x in args.chunks.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    info = dict(torch=torch.__version__, varlen=pa.VARLEN is not None,
                enable_gqa=bool(pa.VARLEN and pa.VARLEN[2]))
    if dev.type == "cuda":
        info["device"] = torch.cuda.get_device_name(dev)
    log(f"{info}")
    if pa.VARLEN is None:
        check("varlen_attn available", False, "this torch has no torch.nn.attention.varlen")
        return 1
    h, hkv, d = (16, 4, 128) if not args.tiny else (4, 2, 16)
    result = dict(info=info)
    with torch.no_grad():
        check_correctness(dev, dtype, h, hkv, d, args.tiny)
        result["ops"] = bench_ops(dev, dtype, h, hkv, d, chunks, contexts, args.reps)
        if not args.skip_engine:
            bw, mm = ceilings(dev)
            mm = mm or PEAK
            log(f"matmul rate {mm / 1e12:.0f} TFLOP/s" + (f", copy {bw / 1e12:.2f} TB/s" if bw
                                                          else ""))
            result["matmul_rate"] = mm
            result["engine"] = bench_engine(args, dev, dtype, mm)
    result["failed"] = FAILED
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "check_prefill_attention_gpu.json"), "w") as fh:
            json.dump(result, fh, indent=1)
    log(f"{'FAILED: ' + ', '.join(FAILED) if FAILED else 'all checks passed'}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
