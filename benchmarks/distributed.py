"""Distributed training throughput: tokens/s/GPU and peak memory for a parallel layout.

Every rank builds the same model (fp32 master weights), `DistributedWorld` shards it (FSDP2 with
bf16 compute, `parallel.param_dtype = bfloat16`), and a few optimizer steps on random packed
tokens are timed after warm-up, exactly as the trainer forms the loss. The one-GPU baseline is
the same code under `torchrun --nproc_per_node 1` (a one-rank mesh). Each run prints a JSON line
(and appends it to --out); `report` turns a results file into the BENCHMARKS.md tables.

    torchrun --nproc_per_node 2 benchmarks/distributed.py train --preset 1b --layouts dp2,ep2 \
        --seq-len 8192 --rows 2
    torchrun --nproc_per_node 2 benchmarks/distributed.py train --preset 1b --layouts cp2 \
        --seq-len 131072 --rows 1 --checkpointing
    python benchmarks/distributed.py report results.jsonl

Layouts: single (1 GPU), dp<N> (FSDP over N), ep<N> (experts over N ranks), cp<N> (LASP+ and
ring attention over N ranks); a suffix g<K> splits MoE tokens into K overlap groups (ep2g2),
`+` combines (cp2+ep2). The equivalence checks on the same GPUs are
`torchrun --nproc_per_node 2 tests/parallel_checks.py`."""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import re
import sys
import time

import torch


def parse_layout(name: str, world_size: int):
    from minimax01.parallel.world import ParallelConfig

    cfg = ParallelConfig(param_dtype="bfloat16")
    if name == "single":
        if world_size != 1:
            raise ValueError("layout 'single' needs --nproc_per_node 1")
        return cfg
    for part in name.split("+"):
        m = re.fullmatch(r"(dp|ep|cp)(\d+)(?:g(\d+))?", part)
        if not m:
            raise ValueError(f"bad layout part {part!r} (dp<N>, ep<N>[g<K>], cp<N>)")
        kind, n = m.group(1), int(m.group(2))
        if kind == "dp":
            cfg.dp_shard = n
        elif kind == "ep":
            cfg.ep = n
            cfg.ep_token_groups = int(m.group(3) or 1)
        else:
            cfg.cp = n
    return cfg


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def _card() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _batch(world, vocab: int, rows: int, seq: int, step: int):
    """One packed row per data rank: `rows` documents of `seq` tokens (trainer conventions:
    next-token targets, cu_seqlens), cut for this CP rank."""
    from minimax01.parallel.batch import next_token_targets

    g = torch.Generator(device="cpu").manual_seed(1000 * step + world.dp_rank)
    ids = torch.randint(0, vocab, (1, rows * seq), generator=g).to(world.device)
    cu = torch.arange(0, rows * seq + 1, seq, dtype=torch.int32, device=world.device)
    batch = dict(input_ids=ids, labels=next_token_targets(ids, cu), cu_seqlens=cu,
                 shift_labels=False)
    return world.shard_batch(batch)


def run_one(args, layout: str, seq: int) -> dict:
    import torch.distributed as dist

    from minimax01.config import ModelConfig
    from minimax01.model.model import MiniMaxForCausalLM
    from minimax01.parallel.distributed import DistributedWorld
    from minimax01.parallel.parallelize import parallelize

    pcfg = parse_layout(layout, dist.get_world_size())
    world = DistributedWorld(pcfg)
    cfg = ModelConfig.from_preset(args.preset, **({"capacity_factor": args.capacity_factor}
                                                  if args.capacity_factor else {}))
    torch.manual_seed(0)
    with torch.device(world.device):
        model = MiniMaxForCausalLM(cfg)
    model.float()
    model.set_gradient_checkpointing(args.checkpointing)
    model = parallelize(model, world, pcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        batch = _batch(world, cfg.vocab_size, args.rows, seq, step)
        _sync()
        t0 = time.perf_counter()
        out = model(batch["input_ids"], labels=batch["labels"], cu_seqlens=batch.get("cu_seqlens"),
                    position_ids=batch.get("position_ids"), shift_labels=False,
                    loss_chunk_size=args.loss_chunk)
        n = batch["labels"].ne(-100).sum()
        n_global = world.all_reduce(n, "sum")
        loss = world.loss_scale.rank_loss(out.lm_loss * n, n_global, out.aux_loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()
        times.append(time.perf_counter() - t0)
    step_s = sorted(times[args.warmup:])[len(times[args.warmup:]) // 2]  # median
    tokens = world.dp_size * args.rows * seq  # per step, all ranks (a CP group shares rows)
    peak = torch.tensor([_peak_gib()], device=world.device)
    peak = float(world.all_reduce(peak, "max"))
    flops = cfg.flops_per_token(seq, training=True)
    result = {"layout": layout, "gpus": world.world_size, "preset": args.preset, "seq_len": seq,
              "rows_per_dp_rank": args.rows, "tokens_per_step": tokens,
              "step_s": round(step_s, 4), "tokens_per_s": round(tokens / step_s, 1),
              "tokens_per_s_per_gpu": round(tokens / step_s / world.world_size, 1),
              "model_tflops_per_gpu": round(tokens / step_s * flops / world.world_size / 1e12, 1),
              "peak_mem_gib": round(peak, 2), "loss": round(float(loss.detach()), 4),
              "checkpointing": args.checkpointing, "loss_chunk": args.loss_chunk,
              "capacity_factor": args.capacity_factor, "steps": args.steps,
              "card": _card(), "torch": torch.__version__,
              "date": datetime.date.today().isoformat()}
    del model, opt, out, loss
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def cmd_train(args) -> int:
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", 0))
    timeout = datetime.timedelta(seconds=args.timeout)
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local), timeout=timeout)
    else:  # CPU dry run of the same code (gloo)
        dist.init_process_group("gloo", timeout=timeout)
    rank = dist.get_rank()
    status = 0
    for layout in args.layouts.split(","):
        for seq in [int(s) for s in args.seq_len.split(",")]:
            try:
                result = run_one(args, layout, seq)
            except torch.cuda.OutOfMemoryError as e:
                result = {"layout": layout, "gpus": dist.get_world_size(), "preset": args.preset,
                          "seq_len": seq, "rows_per_dp_rank": args.rows, "oom": True,
                          "error": str(e).splitlines()[0][:200],
                          "card": _card(), "torch": torch.__version__,
                          "date": datetime.date.today().isoformat()}
                status = 3
            if rank == 0:
                line = json.dumps(result)
                print("RESULT " + line, flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(line + "\n")
            if result.get("oom"):
                if dist.get_world_size() > 1:  # the other ranks may be stuck in a collective
                    sys.stdout.flush()
                    os._exit(status)
                break  # longer sequences will not fit either
    dist.destroy_process_group()
    return status


# ---------------------------------------------------------------------- report
def cmd_report(args) -> int:
    rows = [json.loads(line) for line in open(args.results) if line.strip()]
    ok = [r for r in rows if not r.get("oom")]
    print("| layout | GPUs | seq len | tokens/step | step s | tokens/s/GPU | model TFLOP/s/GPU | "
          "peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("oom"):
            print(f"| {r['layout']} | {r['gpus']} | {r['seq_len']} | | OOM | | | |")
            continue
        print(f"| {r['layout']} | {r['gpus']} | {r['seq_len']} | {r['tokens_per_step']} | "
              f"{r['step_s']:.3f} | {r['tokens_per_s_per_gpu']:.0f} | "
              f"{r['model_tflops_per_gpu']:.0f} | {r['peak_mem_gib']:.1f} |")
    single = {r["seq_len"]: r for r in ok if r["layout"] == "single"}
    cps = [r for r in ok if r["layout"].startswith("cp")]
    if cps:
        print("\n| seq len | 1 GPU tokens/s | CP tokens/s (all GPUs) | speedup | efficiency |")
        print("|---|---|---|---|---|")
        for r in cps:
            base = single.get(r["seq_len"])
            if base is None:
                print(f"| {r['seq_len']} | does not fit | {r['tokens_per_s']:.0f} | | |")
                continue
            speed = r["tokens_per_s"] / base["tokens_per_s"]
            print(f"| {r['seq_len']} | {base['tokens_per_s']:.0f} | {r['tokens_per_s']:.0f} | "
                  f"{speed:.2f}x | {100 * speed / r['gpus']:.0f}% |")
    by = {r["layout"]: r for r in ok if r["layout"].startswith(("dp", "ep"))}
    if "dp2" in by:
        print("\n| layout | tokens/s/GPU | vs dp2 |")
        print("|---|---|---|")
        for name, r in by.items():
            print(f"| {name} | {r['tokens_per_s_per_gpu']:.0f} | "
                  f"{r['tokens_per_s_per_gpu'] / by['dp2']['tokens_per_s_per_gpu']:.2f}x |")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="time training steps (under torchrun)")
    t.add_argument("--preset", default="1b")
    t.add_argument("--layouts", default="single", help="comma-separated layouts")
    t.add_argument("--seq-len", default="8192", help="comma-separated, ascending")
    t.add_argument("--rows", type=int, default=1, help="documents of seq-len per data rank")
    t.add_argument("--steps", type=int, default=3)
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    t.add_argument("--loss-chunk", type=int, default=8192, help="chunked lm loss (0: off)")
    t.add_argument("--capacity-factor", type=float, default=None, help="token drop")
    t.add_argument("--timeout", type=int, default=300, help="NCCL timeout, seconds")
    t.add_argument("--out", default=None, help="append JSON lines here")
    r = sub.add_parser("report", help="markdown tables from a results file")
    r.add_argument("results")
    args = p.parse_args(argv)
    return cmd_train(args) if args.cmd == "train" else cmd_report(args)


if __name__ == "__main__":
    sys.exit(main())
