"""GPU smoke test of the model's torch paths (bf16): packed forward/backward (varlen attention,
grouped expert matmuls), padded batches, cached generation. Prints what ran and how long.
Also measures the card's copy bandwidth and bf16 matmul rate (the roofline ceilings).

    python benchmarks/smoke_gpu.py
"""

import time

import torch

from minimax01 import MiniMaxForCausalLM, ModelConfig, generate
from minimax01.model.cache import HybridCache


def ceilings():
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        b.copy_(a)
    torch.cuda.synchronize()
    bw = 2 * n * 20 / (time.perf_counter() - t)
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn_like(x)
    for _ in range(3):
        x @ y
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        x @ y
    torch.cuda.synchronize()
    flops = 2 * 8192 ** 3 * 20 / (time.perf_counter() - t)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read+write), bf16 matmul {flops / 1e12:.0f} TFLOP/s")


def main():
    print(torch.__version__, torch.cuda.get_device_name())
    ceilings()
    torch.manual_seed(0)
    for backend in ("chunk", "triton"):
        cfg = ModelConfig.from_preset("debug", head_dim=64, rotary_dim=32, hidden_size=256,
                                      intermediate_size=256, dtype="bfloat16")
        model = MiniMaxForCausalLM(cfg).cuda().to(torch.bfloat16)
        import minimax01.ops.lightning as lt
        orig = lt.lightning_attn

        def forced(q, k, v, slope, ctx):  # an attn_fn (no cache: training forwards only)
            return orig(q, k, v, slope, cu_seqlens=ctx.cu_seqlens, backend=backend)[0]

        for layer in model.model.layers:
            if hasattr(layer.self_attn, "qkv_proj"):
                layer.self_attn.attn_fn = forced
        ids = torch.randint(0, 256, (1, 4096), device="cuda")
        cu = torch.tensor([0, 1000, 1001, 3000, 4096], device="cuda", dtype=torch.int32)
        try:
            out = model(ids, labels=ids, cu_seqlens=cu)
            out.loss.backward()
            torch.cuda.synchronize()
            sep = model(ids[:, 1001:3000]).logits
            err = (out.logits[:, 1001:3000] - sep).abs().max().item()
            print(f"[{backend}] packed fwd+bwd ok, loss {out.loss.item():.4f}, packed-vs-separate "
                  f"max|dlogit| {err:.3e}")
        except Exception as e:  # report and continue: this is a smoke test
            print(f"[{backend}] packed fwd+bwd FAILED: {type(e).__name__}: {e}")
    model.eval()
    for layer in model.model.layers:  # generate() uses a cache: back to the model's own path
        layer.self_attn.attn_fn = None
    prompts = [[1, 2, 3], list(range(10, 60))]
    t = time.perf_counter()
    toks = generate(model, prompts, max_new_tokens=32)
    torch.cuda.synchronize()
    print(f"generate ok {tuple(toks.shape)} in {time.perf_counter() - t:.2f}s")
    cache = HybridCache(cfg, 2, 64, device="cuda", dtype=torch.bfloat16)
    print("cache bytes", cache.memory_bytes())


if __name__ == "__main__":
    main()
