"""Where the time of one engine step goes while a long prompt is admitted (issue 18: the ~30 ms
fixed cost of a step that carries a small prefill chunk beside the decodes).

    python benchmarks/profile_admission_gpu.py                 # one H200, `1b`, ~3 minutes
    python benchmarks/profile_admission_gpu.py --tiny          # CPU smoke run
    python benchmarks/profile_admission_gpu.py --variants fused --budgets 512

`--variants` (comma list): `plain` (the prefill forward unfused, `fused_prefill=False`), `fused`
(the engine's default: fused norms, infer/fused_prefill.py), `fold` (fused + the decode rows
folded into the packed prefill, `fold_decodes=True`).

`--decoders` distinct sequences decode; one `--long-prompt` prompt is admitted under
`--budget` tokens per step. After a few warm steps, `--steps` steps run under torch.profiler:
prints each step's wall time, the GPU busy time inside it, the kernel launches per step, the top operators by self CUDA time
and by self CPU time, and the host synchronisations (cudaStreamSynchronize / item / tolist).
Writes profile_admission.json (and a Chrome trace) to $OUT when set."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from minimax01 import MiniMaxForCausalLM, ModelConfig  # noqa: E402
from minimax01.infer.engine import Engine  # noqa: E402
from minimax01.infer.prepare import cast_model  # noqa: E402
from minimax01.infer.request import SamplingParams  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--preset", default="1b")
    p.add_argument("--long-prompt", type=int, default=65536)
    p.add_argument("--short-prompt", type=int, default=512)
    p.add_argument("--decoders", type=int, default=32)
    p.add_argument("--budgets", default="512,2048")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--variants", default="plain,fused,fold")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    if args.tiny:
        from check_serving_gpu import small_config  # noqa: E402

        cfg, dtype = small_config(300), torch.float32
        args.long_prompt, args.short_prompt, args.decoders = 600, 16, 4
    else:
        cfg, dtype = ModelConfig.from_preset(args.preset), torch.bfloat16
    torch.manual_seed(0)
    model = cast_model(MiniMaxForCausalLM(cfg).eval(), device, dtype)
    out_dir = os.environ.get("OUT")
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu",
              "torch": torch.__version__, "runs": []}
    from torch.profiler import ProfilerActivity, profile

    variants = {"plain": dict(fused_prefill=False), "fused": dict(fused_prefill=True),
                "fold": dict(fused_prefill=True, fold_decodes=True)}
    runs = [(b, v) for b in [int(x) for x in args.budgets.split(",")]
            for v in args.variants.split(",")]
    for budget, variant in runs:
        g = torch.Generator().manual_seed(budget)
        eng = Engine(model, num_slots=args.decoders + 1, max_context=args.long_prompt + 64,
                     max_num_batched_tokens=budget, **variants[variant])
        keep = SamplingParams(max_tokens=args.long_prompt + 64 - args.short_prompt, temperature=0.0,
                              ignore_eos=True)
        for _ in range(args.decoders):
            eng.add_request(torch.randint(1, cfg.vocab_size, (args.short_prompt,),
                                          generator=g).tolist(), keep)
        while any(s.prefilling for s in eng.scheduler.running) or eng.scheduler.waiting:
            eng.step()
        for _ in range(5):
            eng.step()
        long_ids = torch.randint(1, cfg.vocab_size, (args.long_prompt,), generator=g).tolist()
        eng.add_request(long_ids, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        for _ in range(4):  # warm: the mixed step's first launches
            eng.step()
        walls = []
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts, record_shapes=False) as prof:
            for _ in range(args.steps):
                if cuda:
                    torch.cuda.synchronize()
                t = time.perf_counter()
                eng.step()
                if cuda:
                    torch.cuda.synchronize()
                walls.append((time.perf_counter() - t) * 1e3)
        # outside the profiler: the plain step time
        plain = []
        for _ in range(args.steps):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            eng.step()
            if cuda:
                torch.cuda.synchronize()
            plain.append((time.perf_counter() - t) * 1e3)
        eng.close()
        ka = prof.key_averages()
        gpu_us = sum(e.self_device_time_total for e in ka) if cuda else 0.0
        syncs = {e.key: e.count for e in ka
                 if any(s in e.key for s in ("Synchronize", "aten::item", "_local_scalar_dense",
                                             "aten::tolist", "cudaMemcpy"))}
        launches = sum(e.count for e in ka if e.key in ("cudaLaunchKernel", "cuLaunchKernelEx",
                                                        "cuLaunchKernel")) / args.steps
        by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(f"\n=== budget {budget}, {variant}: steps (profiled) "
              f"{['%.1f' % w for w in walls]} ms; plain {['%.1f' % w for w in plain]} ms; GPU "
              f"busy per step {gpu_us / 1e3 / args.steps:.2f} ms; {launches:.0f} kernel "
              f"launches per step")
        print("host syncs over the profiled steps:", syncs)
        print(ka.table(sort_by=by, row_limit=30, max_name_column_width=60))
        if cuda:
            print(ka.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
        run = {"budget": budget, "variant": variant, "launches_per_step": launches,
               "profiled_ms": walls, "plain_ms": plain,
               "gpu_busy_ms_per_step": gpu_us / 1e3 / args.steps, "syncs": syncs,
               "top_gpu": [(e.key, e.count, e.self_device_time_total / 1e3) for e in
                           sorted(ka, key=lambda e: -e.self_device_time_total)[:40]] if cuda
               else [],
               "top_cpu": [(e.key, e.count, e.self_cpu_time_total / 1e3) for e in
                           sorted(ka, key=lambda e: -e.self_cpu_time_total)[:40]]}
        result["runs"].append(run)
        if out_dir:
            prof.export_chrome_trace(os.path.join(out_dir, f"admission_{budget}_{variant}.json"))
    if out_dir:
        with open(os.path.join(out_dir, "profile_admission.json"), "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
