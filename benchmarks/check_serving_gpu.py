"""GPU check of the serving scheduler and prefix cache (issue 18), one command, < 5 minutes:

    python benchmarks/check_serving_gpu.py            # one H200: correctness, then the budget sweep
    python benchmarks/check_serving_gpu.py --tiny     # the same on the CPU with tiny shapes
    python benchmarks/check_serving_gpu.py --budgets 512,2048 --fold-decodes  # mixed-step variants

1. correctness first: a small fp32 model (TF32 off) serves prefix-sharing greedy requests with
   the prefix cache on and off, several token budgets, chunks not aligned with cache blocks,
   paged K/V (Triton paged attention; pages for about one longest sequence: it preempts):
   tokens must be identical (exit status 1 otherwise; the measurements still run);
2. the token budget under admission (`1b` preset, bf16, random weights): --decoders distinct
   sequences decode while one --long-prompt token prompt (64K) is admitted. For each
   max_num_batched_tokens in --budgets (512, 2K, 8K, the old 16K chunk, and the whole prompt in
   one step = no budget): the decode-only step (ms), every engine step while the long prompt
   prefills (= the running users' inter-token latency: p50 / p99 / max), and the long prompt's
   time to first token. The default (scheduler.DEFAULT_MAX_NUM_BATCHED_TOKENS) should be the
   smallest budget with TTFT <= 1.3x the no-budget TTFT, which also keeps p99 ITL <= 3x the
   decode-only step (issue 18's goal).

Prints every number; writes JSON to --json PATH and to $OUT/check_serving.json when $OUT is set."""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from minimax01 import MiniMaxForCausalLM, ModelConfig  # noqa: E402
from minimax01.config import hybrid_layer_types  # noqa: E402
from minimax01.infer.engine import Engine  # noqa: E402
from minimax01.infer.prepare import cast_model  # noqa: E402
from minimax01.infer.request import SamplingParams  # noqa: E402
from minimax01.infer.scheduler import DEFAULT_MAX_NUM_BATCHED_TOKENS  # noqa: E402


def small_config(vocab=1000) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, hidden_size=128, intermediate_size=64,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=32, rotary_dim=16, layer_types=hybrid_layer_types(4, 2),
                       num_local_experts=4, num_experts_per_tok=2, block_size=64,
                       dtype="float32", rope_theta=10_000.0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def correctness(device, tiny: bool) -> dict:
    """Greedy tokens with the prefix cache on == off, over prefix-sharing requests."""
    torch.manual_seed(0)
    cfg = small_config()
    model = cast_model(MiniMaxForCausalLM(cfg).eval(), device, torch.float32)
    rng = random.Random(1)
    scale = 1 if tiny else 8
    systems = [[rng.randrange(cfg.vocab_size) for _ in range(40 * scale)] for _ in range(2)]
    prompts = []
    for i in range(12):
        base = list(rng.choice(systems)) if i % 4 else []
        if prompts and i % 3 == 0:
            base = list(rng.choice(prompts))
        prompts.append(base + [rng.randrange(cfg.vocab_size) for _ in range(rng.randint(1, 30 * scale))])
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    ctx = max(map(len, prompts)) + 16
    ref = None
    out = {"mismatches": 0, "runs": []}
    for budget, block, cache, page in ((512, 64, False, None), (512, 64, True, None),
                                       (37, 16, True, None), (100, 32, True, None),
                                       (100, 32, True, 16), (512, 64, False, 16)):
        eng = Engine(model, num_slots=4, max_context=ctx, max_num_batched_tokens=budget,
                     prefix_cache=cache, prefix_block_size=block, kv_page_size=page,
                     kv_pages=None if page is None else ctx // page + 2)
        got = [o.token_ids for o in eng.generate(prompts, params)]
        got += [o.token_ids for o in eng.generate(prompts[::-1], params)][::-1]
        bad = 0 if ref is None else sum(a != b for a, b in zip(got, ref))
        ref = ref or got
        hit = eng.prefix_cache.info()["hit_rate"] if cache else 0.0
        out["runs"].append({"budget": budget, "block": block, "prefix_cache": cache,
                            "kv_page_size": page, "mismatched_requests": bad, "hit_rate": hit,
                            "preemptions": eng.scheduler.num_preemptions})
        out["mismatches"] += bad
        print(f"  budget {budget:>4}, block {block:>3}, prefix cache {'on ' if cache else 'off'}, "
              f"pages {page or '-':>2}: {bad} of {len(got)} requests differ, hit rate {hit:.2f}, "
              f"{eng.scheduler.num_preemptions} preemptions", flush=True)
        eng.close()
    return out


def admission(model, device, budget: int, args) -> dict:
    """`args.decoders` sequences decoding, then one long prompt admitted; times every step."""
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(budget)
    eng = Engine(model, num_slots=args.decoders + 1, max_context=args.long_prompt + 64,
                 max_num_batched_tokens=budget, fold_decodes=args.fold_decodes,
                 fused_prefill=False if args.no_fused_prefill else None)
    # the decoders keep decoding through the whole admission (their slots hold max_context)
    keep = SamplingParams(max_tokens=args.long_prompt + 64 - args.short_prompt, temperature=0.0,
                          ignore_eos=True)
    for _ in range(args.decoders):  # distinct sequences: every row routes differently
        eng.add_request(torch.randint(1, vocab, (args.short_prompt,), generator=g).tolist(), keep)
    while any(s.prefilling for s in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()
    decode_only = []
    for _ in range(args.decode_steps):
        sync(device)
        t = time.perf_counter()
        eng.step()
        sync(device)
        decode_only.append(time.perf_counter() - t)
    long_ids = torch.randint(1, vocab, (args.long_prompt,), generator=g).tolist()
    rid = eng.add_request(long_ids, SamplingParams(max_tokens=2, temperature=0.0,
                                                   ignore_eos=True))
    steps, t0, ttft = [], time.perf_counter(), None
    while ttft is None:
        sync(device)
        t = time.perf_counter()
        outs = eng.step()
        sync(device)
        steps.append(time.perf_counter() - t)
        if any(o.request_id == rid and o.token_ids for o in outs):
            ttft = time.perf_counter() - t0
    eng.close()
    ms = lambda xs, q: sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] * 1e3  # noqa: E731
    return {"budget": budget, "decode_only_ms": ms(decode_only, 0.5),
            "itl_p50_ms": ms(steps, 0.5), "itl_p99_ms": ms(steps, 0.99),
            "itl_max_ms": max(steps) * 1e3, "steps": len(steps), "ttft_s": ttft}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU")
    p.add_argument("--device", default=None)
    p.add_argument("--preset", default="1b")
    p.add_argument("--long-prompt", type=int, default=65536)
    p.add_argument("--short-prompt", type=int, default=512)
    p.add_argument("--decoders", type=int, default=32)
    p.add_argument("--decode-steps", type=int, default=30)
    p.add_argument("--budgets", default="512,2048,8192,16384,0",
                   help="max_num_batched_tokens values; 0 = the whole prompt in one step")
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--no-fused-prefill", action="store_true",
                   help="admission: the prefill forward unfused (infer/fused_prefill.py)")
    p.add_argument("--fold-decodes", action="store_true",
                   help="admission: decode rows inside the packed prefill on mixed steps")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny
                                          else "cpu"))
    if args.tiny:
        args.long_prompt, args.short_prompt, args.decoders, args.decode_steps = 600, 16, 4, 5
        args.budgets = "64,256,0"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    print(f"check_serving_gpu on {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", torch {torch.__version__}, default budget {DEFAULT_MAX_NUM_BATCHED_TOKENS}")
    print("1. prefix cache on == off (fp32, greedy):", flush=True)
    result = {"correctness": correctness(device, args.tiny), "device": str(device),
              "torch": torch.__version__}
    ok = result["correctness"]["mismatches"] == 0
    print(f"   {'OK' if ok else 'FAILED'}")
    torch.manual_seed(0)
    cfg = small_config(vocab=300) if args.tiny else ModelConfig.from_preset(args.preset)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model = cast_model(MiniMaxForCausalLM(cfg).eval(), device, dtype)
    print(f"2. {args.decoders} decoding + one {args.long_prompt}-token prompt admitted "
          f"({'tiny' if args.tiny else args.preset}, {dtype}):")
    print(f"   {'budget':>8} {'decode-only':>11} {'ITL p50':>9} {'p99':>9} {'max':>9} "
          f"{'steps':>6} {'TTFT':>8} {'p99/decode':>10} {'TTFT/none':>9}")
    rows = []
    budgets = [int(b) or args.long_prompt for b in args.budgets.split(",")]
    admission(model, device, budgets[-1], args) if not args.tiny else None  # warm-up
    for b in budgets:
        rows.append(admission(model, device, b, args))
    none = rows[-1]["ttft_s"]
    for r in rows:
        r["p99_over_decode"] = r["itl_p99_ms"] / r["decode_only_ms"]
        r["ttft_over_no_budget"] = r["ttft_s"] / none
        label = "none" if r["budget"] == args.long_prompt else r["budget"]
        print(f"   {label:>8} {r['decode_only_ms']:>9.2f}ms {r['itl_p50_ms']:>7.2f}ms "
              f"{r['itl_p99_ms']:>7.2f}ms {r['itl_max_ms']:>7.2f}ms {r['steps']:>6} "
              f"{r['ttft_s']:>7.3f}s {r['p99_over_decode']:>10.2f} "
              f"{r['ttft_over_no_budget']:>9.2f}", flush=True)
    good = [r["budget"] for r in rows if r["ttft_over_no_budget"] <= 1.3
            and r["p99_over_decode"] <= 3.0]
    print(f"   budgets meeting both goals (TTFT <= 1.3x none, p99 ITL <= 3x decode): "
          f"{good or 'none'}")
    result["admission"] = rows
    result["budgets_meeting_goals"] = good
    for path in filter(None, [args.json, os.environ.get("OUT") and
                              os.path.join(os.environ["OUT"], "check_serving.json")]):
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
