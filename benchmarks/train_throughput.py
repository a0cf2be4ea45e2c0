"""Training throughput of the `1b` model: tokens/s and MFU at several sequence lengths for the
hybrid (7 lightning : 1 softmax), an all-softmax and an all-lightning variant of the same size.

One training step is what the trainer does: bf16 autocast over fp32 master weights, activation
checkpointing, the chunked lm_head + cross entropy, gradient clipping, fused AdamW. Every step
holds the same number of tokens (`--tokens`, default 64K) as [tokens / T, T] rows of single
documents. MFU counts `cfg.flops_per_token(T, training=True)` (matmul FLOPs, 3x forward, the
recompute not counted) against the bf16 matmul rate measured in the same run, and against the
989 TFLOP/s datasheet peak of an H100 SXM.

    python benchmarks/train_throughput.py [--plan "hybrid:4,8,16,32,64 softmax:4,32"] [--steps 3]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from minimax01 import MiniMaxForCausalLM, ModelConfig
from minimax01.config import FULL, LINEAR
from minimax01.train.config import OptimConfig
from minimax01.train.optim import build_optimizer

DATASHEET = 989e12


def matmul_peak() -> float:
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn_like(x)
    for _ in range(5):
        x @ y
    torch.cuda.synchronize()
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(20):
            x @ y
        torch.cuda.synchronize()
        best = max(best, 2 * 8192 ** 3 * 20 / (time.perf_counter() - t))
    return best


def variant(name: str, preset: str) -> ModelConfig:
    cfg = ModelConfig.from_preset(preset)
    n = cfg.num_hidden_layers
    if name == "softmax":
        return cfg.replace(layer_types=[FULL] * n)
    if name == "lightning":
        return cfg.replace(layer_types=[LINEAR] * n)
    return cfg


def force_lightning_backend(model, backend: str, opaque: bool = False) -> None:
    """`opaque`: torch.compile does not trace the lightning call (a graph break around it: the
    Triton kernels run as they do eagerly)."""
    from minimax01.ops import lightning_attn

    def fn(q, k, v, slope, ctx):  # an attn_fn: computes every call, given the AttnContext
        return lightning_attn(q, k, v, slope, cu_seqlens=ctx.cu_seqlens, backend=backend)[0]

    if opaque:
        fn = torch.compiler.disable(fn)

    for layer in model.model.layers:
        if hasattr(layer.self_attn, "qkv_proj"):
            layer.self_attn.attn_fn = fn


def check_triton(model) -> str:
    """'triton' if the Triton lightning kernels run forward and backward here, else 'chunk'."""
    from minimax01.ops import lightning_attn

    try:
        q, k, v = (torch.randn(1, 512, 4, 128, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        slope = torch.linspace(0.01, 0.5, 4, device="cuda")
        o, _ = lightning_attn(q, k, v, slope, backend="triton")
        ref, _ = lightning_attn(q.float(), k.float(), v.float(), slope, backend="chunk")
        o.float().sum().backward()
        err = (o.float() - ref).abs().max().item() / ref.abs().max().item()
        if not math.isfinite(err) or err > 2e-2:
            raise RuntimeError(f"relative error {err:.2e}")
        return "triton"
    except Exception as e:  # noqa: BLE001 - report and fall back
        print(f"triton lightning backend failed ({type(e).__name__}: {e}); using 'chunk'")
        return "chunk"


def probe_cudnn_gqa() -> str:
    """Whether cuDNN SDPA takes this model's causal GQA shapes (else flash runs them)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 16, 4096, 128, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(1, 4, 4096, 128, device="cuda", dtype=torch.bfloat16)
    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
        return "cuDNN"
    except RuntimeError as e:
        return f"flash (cuDNN refused GQA: {str(e).splitlines()[0][:120]})"


def train_step(model, opt, ids, labels, chunk):
    device = ids.device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        out = model(ids, labels=labels, shift_labels=False, loss_chunk_size=chunk)
    (out.lm_loss + out.aux_loss).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.lm_loss


def measure(model, opt, cfg, seq, tokens, steps, chunk):
    rows = max(tokens // seq, 1)
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    ids = torch.randint(0, cfg.vocab_size, (rows, seq), device=device)
    labels = torch.randint(0, cfg.vocab_size, (rows, seq), device=device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    loss = train_step(model, opt, ids, labels, chunk)  # warm-up: kernels compile / autotune here
    assert torch.isfinite(loss), loss
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        train_step(model, opt, ids, labels, chunk)
    sync()
    dt = (time.perf_counter() - t) / steps
    return rows * seq / dt, (torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="1b", help="model preset (debug: a CPU smoke run)")
    ap.add_argument("--plan", default="hybrid:4,8,16,32,64 softmax:4,8,16,32,64 lightning:4,16,64",
                    help="variant:seq,seq,... (seqs in K tokens), space-separated; variants "
                         "hybrid, softmax, lightning")
    ap.add_argument("--tokens", type=int, default=65536, help="tokens per step")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=8192, help="loss_chunk_size")
    ap.add_argument("--backend", default="auto", help="lightning backend: auto | triton | chunk")
    args = ap.parse_args()
    plan = []
    for item in args.plan.split():
        name, _, ks = item.partition(":")
        plan.append((name, [int(float(k) * 1024) for k in ks.split(",")]))
    seqs = sorted({s for _, ss in plan for s in ss})
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    card = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"torch {torch.__version__}, {card}, {args.tokens} tokens per step, "
          f"{args.steps} timed steps, loss chunk {args.chunk}")
    peak = matmul_peak() if cuda else None
    if peak:
        print(f"measured bf16 matmul peak: {peak / 1e12:.0f} TFLOP/s "
              f"(datasheet {DATASHEET / 1e12:.0f}); softmax attention runs on "
              f"{probe_cudnn_gqa()}", flush=True)
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    backend = None
    start = time.perf_counter()
    for name, variant_seqs in plan:
        cfg = variant(name, args.preset)
        torch.manual_seed(0)
        with torch.device(device):
            model = MiniMaxForCausalLM(cfg).float()  # fp32 master weights, as the trainer
        model.set_gradient_checkpointing(True)
        model.train()
        if backend is None:
            backend = (args.backend if args.backend != "auto" else
                       check_triton(model) if cuda else "chunk")
        force_lightning_backend(model, backend)
        opt = build_optimizer(model, OptimConfig())
        for seq in variant_seqs:
            ctx = contextlib.ExitStack()
            if cuda:  # cuDNN attention first, flash where cuDNN cannot take a shape
                ctx.enter_context(sdpa_kernel([SDPBackend.CUDNN_ATTENTION,
                                               SDPBackend.FLASH_ATTENTION,
                                               SDPBackend.EFFICIENT_ATTENTION], set_priority=True))
            try:
                with ctx:
                    tps, mem = measure(model, opt, cfg, seq, args.tokens, args.steps, args.chunk)
            except torch.OutOfMemoryError:
                print(f"{name:9s} T={seq:6d}: out of memory")
                torch.cuda.empty_cache()
                continue
            fpt = cfg.flops_per_token(seq, training=True)
            m1 = fpt * tps / peak if peak else float("nan")
            m2 = fpt * tps / DATASHEET
            rows.append((name, seq, tps, m1, m2, mem))
            print(f"{name:9s} T={seq:6d}: {tps:9.0f} tok/s  MFU {100 * m1:5.1f}% (measured peak) "
                  f"{100 * m2:5.1f}% (datasheet)  peak mem {mem:5.1f} GiB  "
                  f"[{time.perf_counter() - start:.0f}s]", flush=True)
        del model, opt
        if cuda:
            torch.cuda.empty_cache()
    print(f"\nlightning backend: {backend}\n")
    print("| variant | seq | tokens/s | MFU (measured peak) | MFU (989 TFLOP/s) | peak memory GiB |")
    print("|---|---|---|---|---|---|")
    for name, seq, tps, m1, m2, mem in rows:
        print(f"| {name} | {seq // 1024}K | {tps:,.0f} | {100 * m1:.1f}% | {100 * m2:.1f}% | "
              f"{mem:.1f} |")
    by = {(n, s): t for n, s, t, *_ in rows}
    hyb = [(s, by[("hybrid", s)]) for s in seqs if ("hybrid", s) in by]
    if len(hyb) > 1:
        tps = [t for _, t in hyb]
        print(f"\nhybrid tokens/s spread {hyb[0][0] // 1024}K..{hyb[-1][0] // 1024}K: "
              f"{100 * (max(tps) - min(tps)) / max(tps):.1f}% (target <= 15%)")
    for s in seqs:
        if ("hybrid", s) in by and ("softmax", s) in by:
            print(f"hybrid / softmax at {s // 1024}K: {by[('hybrid', s)] / by[('softmax', s)]:.2f}x")


if __name__ == "__main__":
    main()
