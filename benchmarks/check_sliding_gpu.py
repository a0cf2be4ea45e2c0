"""GPU check of the sliding-window softmax paths (CPU-tested in tests/test_sliding.py, not yet run
on a GPU by their author): on CUDA, in bf16 and fp32, the blocked windowed op and the model's
packed / padded / cached paths against a float64 masked reference on the CPU, and the time of a
packed windowed forward against full causal attention.

    python benchmarks/check_sliding_gpu.py          # < 1 minute; prints a table, exit 1 on a mismatch
"""

from __future__ import annotations

import math
import sys
import time

import torch

from minimax01 import MiniMaxForCausalLM, ModelConfig
from minimax01.config import FULL, LINEAR, SLIDING
from minimax01.model.cache import HybridCache
from minimax01.ops.attention import causal_attention, windowed_attention


def reference(q, k, v, window, cu=None, scale=None):
    q, k, v = (x.double().cpu() for x in (q, k, v))
    t = q.shape[1]
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * (scale or q.shape[-1] ** -0.5)
    i = torch.arange(t)
    dist = i[:, None] - i[None, :]
    mask = (dist >= 0) & (dist < window)
    if cu is not None:
        doc = torch.repeat_interleave(torch.arange(len(cu) - 1), torch.tensor(cu).diff())
        mask &= doc[:, None] == doc[None, :]
    s = s.masked_fill(~mask, -math.inf)
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    dev = torch.device("cuda")
    rows, ok = [], True
    g = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 3e-2)):
        for t, w, cu in ((300, 17, None), (2048, 256, [0, 700, 701, 2048]), (4096, 1024, None)):
            q = torch.randn(1, t, 8, 64, generator=g)
            k, v = torch.randn(1, t, 2, 64, generator=g), torch.randn(1, t, 2, 64, generator=g)
            ref = reference(q, k, v, w, cu)
            cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=dev)
            got = causal_attention(q.to(dev, dtype), k.to(dev, dtype), v.to(dev, dtype),
                                   cu_seqlens=cu_t, window=w).double().cpu()
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            good = err < tol
            ok &= good
            rows.append((f"op {str(dtype)[6:]} T={t} W={w} docs={len(cu) - 1 if cu else 1}", err,
                         "ok" if good else "MISMATCH"))
    # the model: packed, padded and cached paths on CUDA against the CPU fp32 model
    cfg = ModelConfig.from_preset("debug", layer_types=[LINEAR, SLIDING, LINEAR, FULL],
                                  sliding_window=24)
    torch.manual_seed(0)
    cpu = MiniMaxForCausalLM(cfg).eval()
    gpu = MiniMaxForCausalLM(cfg).to(dev).eval()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randint(0, 256, (2, 90), generator=g)
    with torch.no_grad():
        ref = cpu(x).logits
        checks = {"model forward": gpu(x.to(dev)).logits.cpu()}
        cu = torch.tensor([0, 40, 41, 90], dtype=torch.int32)
        packed = gpu(x[:1].to(dev), cu_seqlens=cu.to(dev)).logits.cpu()
        sep = torch.cat([cpu(x[:1, a:b]).logits for a, b in ((0, 40), (40, 41), (41, 90))], 1)
        checks["model packed"] = (packed, sep)
        cache = HybridCache(cfg, 2, 90, device=dev)
        parts = [gpu(x[:, :50].to(dev), cache=cache).logits]
        parts += [gpu(x[:, i:i + 1].to(dev), cache=cache).logits for i in range(50, 90)]
        checks["model cached (ring)"] = torch.cat(parts, 1).cpu()
    for name, val in checks.items():
        got, want = val if isinstance(val, tuple) else (val, ref)
        err = ((got - want).abs().max() / want.abs().max()).item()
        good = err < 1e-4
        ok &= good
        rows.append((name, err, "ok" if good else "MISMATCH"))
    # time: a packed windowed forward vs full causal (bf16, 32K tokens, 8 documents)
    t = 32768
    q = torch.randn(1, t, 8, 64, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, t, 2, 64, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cu = torch.arange(0, t + 1, t // 8, dtype=torch.int32, device=dev)
    for name, fn in (("full causal (varlen)", lambda: causal_attention(q, k, v, cu_seqlens=cu)),
                     ("window 512 (flash window)",
                      lambda: causal_attention(q, k, v, cu_seqlens=cu, window=512)),
                     ("window 4096 (flash window)",
                      lambda: causal_attention(q, k, v, cu_seqlens=cu, window=4096)),
                     ("window 512 (blocked)", lambda: windowed_attention(q, k, v, 512, cu_seqlens=cu)),
                     ("window 4096 (blocked)",
                      lambda: windowed_attention(q, k, v, 4096, cu_seqlens=cu))):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        rows.append((f"time {name}, 32K tokens", (time.perf_counter() - t0) / 5 * 1e3, "ms"))
    print(f"{'check':45s} {'value':>12s}")
    for name, val, status in rows:
        print(f"{name:45s} {val:12.3e} {status}")
    print("ALL OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
