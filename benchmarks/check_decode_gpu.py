"""Small-batch decode on the GPU (issue 18 item 4): correctness of the fused lightning decode,
residual + RMSNorm and small-batch MoE (ops/decode, infer/fused_decode.py) and of paged attention (ops/paged_attention) in bf16, then the per-step time of the
`1b` decode at B = 1 / 16 / 64 DISTINCT sequences (own tokens, own lightning states, own K/V),
fused against unfused, each replayed from a CUDA graph (infer/cuda_graphs.py: the engine's
forward of one step, without sampling), plus the kernels one eager step launches.

    python benchmarks/check_decode_gpu.py                  # one H200: < 3 minutes
    python benchmarks/check_decode_gpu.py --preset debug --device cpu --dtype float32 \\
        --batches 1,4 --context 32 --steps 2               # CPU smoke run (eager, no graphs)

Prints every number; exits 1 on a mismatch; writes check_decode_gpu.json to $OUT when set."""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from minimax01 import ModelConfig, MiniMaxForCausalLM  # noqa: E402
from minimax01.infer.cuda_graphs import DecodeGraphs  # noqa: E402
from minimax01.infer.fused_decode import fused  # noqa: E402
from minimax01.infer.pool import PagePool  # noqa: E402
from minimax01.infer.prepare import cast_model, prepare_for_serving  # noqa: E402
from minimax01.infer.slot_cache import SlotCache, SlotPool  # noqa: E402
from minimax01.ops.decode import (torch_lightning_decode_gated,  # noqa: E402
                                  torch_moe_decode, torch_residual_rms_norm,
                                  triton_lightning_decode_gated, triton_moe_decode,
                                  triton_residual_rms_norm)
from minimax01.ops.lightning import lightning_slopes  # noqa: E402
from minimax01.ops.paged_attention import (torch_paged_attention,  # noqa: E402
                                           triton_paged_attention, write_kv)

START = time.time()
FAILED: list[str] = []


def log(msg: str) -> None:
    print(f"[{time.time() - START:6.1f}s] {msg}", flush=True)


def check(name: str, err: float, tol: float) -> None:
    ok = err <= tol
    log(f"{'ok  ' if ok else 'FAIL'} {name}: {err:.3g} (tol {tol:g})")
    if not ok:
        FAILED.append(name)


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class FusedCache:
    """A SlotCache whose decode records run the lightning layers fused (for DecodeGraphs)."""

    def __init__(self, cache: SlotCache):
        self.inner, self.pool = cache, cache.pool

    def begin_decode(self, *args, **kw):
        return fused(self.inner.begin_decode(*args, **kw))


def check_ops(device, dtype) -> None:
    """The fused decode op and paged attention, Triton against the torch twins."""
    g = torch.Generator(device="cpu").manual_seed(0)
    h, d, n = 16, 128, 80
    for b in (1, 16, 64):
        qkv = torch.randn(b, 3 * h * d, generator=g).to(device, dtype)
        gate = torch.randn(b, h * d, generator=g).to(device, dtype)
        state = (0.1 * torch.randn(n, h, d, d, generator=g)).to(device)
        w = (1 + 0.1 * torch.randn(h * d, generator=g)).to(device, dtype)
        slope = lightning_slopes(h, 3, 16).to(device)
        slots = torch.randperm(n, generator=g)[:b].to(device)
        s0, s1 = state.clone(), state.clone()
        ref = torch_lightning_decode_gated(qkv, gate, s0, slope, w, 1e-5, slots)
        out = triton_lightning_decode_gated(qkv, gate, s1, slope, w, 1e-5, slots)
        check(f"fused decode op B={b} output", rel(out, ref), 1e-2)
        check(f"fused decode op B={b} state", rel(s1, s0), 1e-5)
        y0, h0 = torch_residual_rms_norm(gate, w, 1e-5, gate.flip(0), 1.5, 0.7)
        y1, h1 = triton_residual_rms_norm(gate, w, 1e-5, gate.flip(0), 1.5, 0.7)
        check(f"residual + RMSNorm B={b}", max(rel(y1, y0), rel(h1, h0)), 1e-2)
    e, i, hid = (8, 768, 2048) if device.type == "cuda" else (4, 64, 128)  # the 1b MoE on GPU
    gu = (torch.randn(e, 2 * i, hid, generator=g) * hid ** -0.5).to(device, dtype)
    dn = (torch.randn(e, hid, i, generator=g) * i ** -0.5).to(device, dtype)
    for b in (1, 4):
        x = torch.randn(b, hid, generator=g).to(device, dtype)
        logits = torch.randn(b, e, generator=g).to(device, dtype)
        check(f"small-batch MoE B={b}", rel(triton_moe_decode(x, logits, gu, dn, 2),
                                            torch_moe_decode(x, logits, gu, dn, 2)), 1e-2)
    if device.type != "cuda":
        return
    ps, hkv = 16, 4
    ctx, qlen = [0, 3000, 4095, 17, 129], [700, 96, 1, 1, 1]
    pool = PagePool(num_pages=sum(c + q for c, q in zip(ctx, qlen)) // ps + 16, page_size=ps)
    kp = torch.randn(pool.num_pages, hkv, ps, d, generator=g).to(device, dtype)
    vp = torch.randn(pool.num_pages, hkv, ps, d, generator=g).to(device, dtype)
    for i, (c, q) in enumerate(zip(ctx, qlen)):
        pool.allocate(i, c + q)
        k = torch.randn(c + q, hkv, d, generator=g).to(device, dtype)
        write_kv(kp, vp, k, -k, pool.slot_mapping(i, 0, c + q, device))
    table = pool.block_table(range(len(ctx)), device=device)
    i32 = dict(dtype=torch.int32, device=device)
    c_t, q_t = torch.tensor(ctx, **i32), torch.tensor(qlen, **i32)
    q = torch.randn(sum(qlen), 16, d, generator=g).to(device, dtype)
    ref = torch_paged_attention(q, kp, vp, table, c_t, q_t, d ** -0.5)
    for splits in (1, 8):
        out = triton_paged_attention(q, kp, vp, table, c_t, q_t, d ** -0.5, num_splits=splits)
        check(f"paged attention splits={splits}", rel(out, ref), 1e-2)


def fill_pool(pool: SlotPool, context: int, seed: int) -> None:
    """Distinct synthetic sequences: every slot its own state, K/V and `context` cached tokens."""
    g = torch.Generator(device=pool.device).manual_seed(seed)
    for s in pool.states.values():
        s.normal_(0.0, 0.02, generator=g)
    for t in (*pool.keys.values(), *pool.values.values()):
        t.normal_(0.0, 1.0, generator=g)
    pool.lengths.fill_(context)


def kernels_per_step(model, step_of, tokens) -> int | None:
    """CUDA kernels one eager decode step launches."""
    if tokens.device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(tokens, cache=step_of())
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="1b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    batches = [int(x) for x in args.batches.split(",")]
    cuda = device.type == "cuda"
    if cuda:
        log(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    check_ops(device, dtype)

    cfg = ModelConfig.from_preset(args.preset)
    torch.manual_seed(0)
    with torch.device(device):
        model = MiniMaxForCausalLM(cfg)
    cast_model(model, dtype=dtype)
    # the float32 reference of the whole-step check: the same (rounded) weights
    model32 = cast_model(copy.deepcopy(model), dtype=torch.float32)
    prepare_for_serving(model)
    prepare_for_serving(model32)
    max_b = max(batches)
    pool = SlotPool(cfg, num_slots=max_b, max_context=args.context + args.steps + 8,
                    device=device, dtype=dtype)
    cache = SlotCache(pool)
    fused_cache = FusedCache(cache)
    log(f"{args.preset}: {cfg.num_hidden_layers} layers, pool {pool.memory_bytes() / 2**30:.2f} GiB")
    rows, g = [], torch.Generator(device="cpu").manual_seed(1)

    # correctness of the whole step: fused against unfused, same pool contents, distinct rows
    # (B = 1: the small-batch MoE too; the largest B: the MoE block itself)
    slots = torch.arange(max_b, device=device)
    active = torch.ones(max_b, dtype=torch.bool, device=device)
    host = [args.context] * max_b
    with torch.no_grad():
        for b in sorted({1, max_b}):
            tokens = torch.randint(0, cfg.vocab_size, (b, 1), generator=g).to(device)
            out = {}
            for name, c in (("unfused", cache), ("fused", fused_cache)):
                fill_pool(pool, args.context, seed=2)
                step = c.begin_decode(slots[:b], active[:b], host[:b])
                logits = model(tokens, cache=step).logits[:, -1]
                out[name] = (logits.float(), {i: s[:b].clone() for i, s in pool.states.items()})
            # the reference: the same step in float32 (weights, pool and activations), from
            # the same bf16 pool contents; fused must be as close to it as unfused is
            fill_pool(pool, args.context, seed=2)
            pool32 = SlotPool(cfg, num_slots=b, max_context=pool.max_context, device=device,
                              dtype=torch.float32)
            for src, dst in ((pool.states, pool32.states), (pool.keys, pool32.keys),
                             (pool.values, pool32.values)):
                for i in src:
                    dst[i][:b].copy_(src[i][:b])
            pool32.lengths.fill_(args.context)
            step32 = SlotCache(pool32).begin_decode(slots[:b], active[:b], host[:b])
            logits32 = model32(tokens, cache=step32).logits[:, -1].float()
            err = {name: (rel(o[0], logits32), max(rel(o[1][i], pool32.states[i][:b])
                                                   for i in pool.states))
                   for name, o in out.items()}
            for name, (el, es) in err.items():
                log(f"     {name:8s} vs float32: logits {el:.3g}, worst layer state {es:.3g}")
            del pool32, step32
            check(f"model step B={b} logits, fused vs unfused",
                  rel(out["fused"][0], out["unfused"][0]), 2e-2)
            check(f"model step B={b} states: fused error vs float32 (tol 1.5x unfused's)",
                  err["fused"][1], 1.5 * err["unfused"][1] + 1e-5)
            agree = (out["fused"][0].argmax(-1) == out["unfused"][0].argmax(-1)).float().mean()
            log(f"     greedy tokens agree on {float(agree):.0%} of {b} rows")
            del out

        for mode, c in (("unfused", cache), ("fused", fused_cache)):
            graphs = DecodeGraphs(model, c, max_b) if cuda else None
            for b in batches:
                fill_pool(pool, args.context, seed=3)
                tok = torch.randint(0, cfg.vocab_size, (b,), generator=g).to(device)
                sl = list(range(b))
                kernels = kernels_per_step(
                    model, lambda: c.begin_decode(slots[:b], active[:b], host[:b]), tok[:, None])
                pool.lengths.fill_(args.context)

                def step():
                    if graphs is not None:
                        return graphs.run(tok, sl)
                    return model(tok[:, None], cache=c.begin_decode(slots[:b], active[:b],
                                                                    [int(x) for x in
                                                                     pool.lengths[:b]])).logits
                for _ in range(3):  # warm-up: captures this batch's graph
                    step()
                pool.lengths.fill_(args.context)
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step()
                if cuda:
                    torch.cuda.synchronize()
                ms = (time.perf_counter() - t0) / args.steps * 1e3
                rows.append(dict(mode=mode, batch=b, context=args.context, ms_per_step=ms,
                                 kernels_per_eager_step=kernels, graphs=cuda))
                log(f"{mode:8s} B={b:3d} ctx={args.context}: {ms:7.3f} ms/step"
                    f"{'' if kernels is None else f', {kernels} kernels per eager step'}")
            del graphs
            if cuda:
                torch.cuda.empty_cache()

    print("\n| batch | unfused ms/step | fused ms/step | speedup | kernels unfused | kernels fused |")
    print("|---:|---:|---:|---:|---:|---:|")
    for b in batches:
        u = next(r for r in rows if r["batch"] == b and r["mode"] == "unfused")
        f = next(r for r in rows if r["batch"] == b and r["mode"] == "fused")
        print(f"| {b} | {u['ms_per_step']:.3f} | {f['ms_per_step']:.3f} | "
              f"{u['ms_per_step'] / f['ms_per_step']:.2f}x | {u['kernels_per_eager_step']} | "
              f"{f['kernels_per_eager_step']} |")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "check_decode_gpu.json"), "w") as fh:
            json.dump(dict(rows=rows, failed=FAILED, preset=args.preset, dtype=args.dtype,
                           device=torch.cuda.get_device_name(device) if cuda else "cpu",
                           torch=torch.__version__), fh, indent=1)
    log("FAILED: " + ", ".join(FAILED) if FAILED else "all checks passed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
