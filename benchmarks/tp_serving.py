"""Tensor-parallel serving (issue 14 / 15): MiniMax-Text-01's real shapes over N GPUs, one run.

    torchrun --nproc_per_node 8 benchmarks/tp_serving.py                      # TP 8, bf16
    torchrun --nproc_per_node 4 benchmarks/tp_serving.py --quantization int8  # TP 4, int8
    python benchmarks/tp_serving.py --layers 8                                # 1 GPU: a slice
    torchrun --nproc_per_node 2 benchmarks/tp_serving.py --tiny --device cpu  # gloo smoke test

Every rank runs this script (SPMD) and the serving engine's own code: rank 0 a TPEngine-style
loop sending each step's record over the step channel (infer/tp_engine.py), the others running
the records they receive, exactly as `serve --tensor-parallel N` does.

  1. correctness: a small fp32 model (TF32 off; --quantization / --expert-parallel as given)
     built whole on every rank and sliced (parallelize_for_inference); rank 0 runs one
     process's Engine on the whole model, then the
     TP group serves the same greedy requests (packed, chunked prefill, slots reused, CUDA-graph
     decode on GPU): tokens must be identical, logits are compared step by step;
  2. Text-01 (80 layers, or --layers L, 7 lightning : 1 softmax) with random weights drawn per
     rank on the meta device (no rank ever holds the whole model): build time, weights and peak
     memory per GPU (max over ranks);
  3. decode step (engine forward incl. the step broadcast, CUDA graphs) at batch 1/16/64 with
     8K and 1M cached tokens per sequence (the K/V lengths are set, the K/V zeroed: the step
     reads what a real context of that length holds); batches that do not fit are marked;
  4. prefill tokens/s of one prompt of 8K / 128K / 1M tokens in chunks of --prefill-chunk;
  5. the collectives' share: the same decode / prefill with the communication skipped
     (TPGroup.skip: wrong numbers, same compute), share = 1 - t_skip / t. On one GPU the
     one-rank NCCL collectives still run (TPGroup.always), so CUDA-graph capture of NCCL
     all-reduce / all-gather inside the decode step is exercised before a multi-GPU run.

Prints one table on rank 0 (and --json PATH). Exit status 1 if the correctness check fails
(the measurements still run)."""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from minimax01 import MiniMaxForCausalLM, ModelConfig  # noqa: E402
from minimax01.config import LINEAR, hybrid_layer_types  # noqa: E402
from minimax01.infer.cuda_graphs import DecodeGraphs  # noqa: E402
from minimax01.infer.engine import Engine  # noqa: E402
from minimax01.infer.prepare import cast_model  # noqa: E402
from minimax01.infer.request import SamplingParams  # noqa: E402
from minimax01.infer.step_record import StepRecord  # noqa: E402
from minimax01.infer.tp_engine import (finish_tensor_parallel, follow,  # noqa: E402
                                       init_tensor_parallel, rank_engine)
from minimax01.parallel.tensor_parallel import (materialize_random,  # noqa: E402
                                                parallelize_for_inference)
from minimax01.quant import quantize_model, quantize_on_meta, resolve  # noqa: E402

GiB = 2 ** 30
K, M = 1024, 1024 * 1024


def ensure_env() -> None:
    """Plain `python benchmarks/tp_serving.py`: a group of one."""
    if "WORLD_SIZE" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))


def text01(layers: int) -> ModelConfig:
    cfg = ModelConfig.from_preset("minimax-text-01")
    return cfg.replace(num_hidden_layers=layers, layer_types=hybrid_layer_types(layers, 8))


def small_config(tiny: bool) -> ModelConfig:
    """Splits over 1, 2, 4 and 8 ranks (8 | 16 heads, 4 KV heads: split or replicated); a vocab
    no TP size divides (padded logits)."""
    if tiny:
        return ModelConfig(vocab_size=301, hidden_size=64, intermediate_size=64,
                           num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                           head_dim=16, rotary_dim=8, layer_types=hybrid_layer_types(4, 2),
                           num_local_experts=8, num_experts_per_tok=2, block_size=16,
                           dtype="float32", rope_theta=10_000.0)
    return ModelConfig(vocab_size=1003, hidden_size=256, intermediate_size=512,
                       num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                       head_dim=16, rotary_dim=8, layer_types=hybrid_layer_types(4, 2),
                       num_local_experts=8, num_experts_per_tok=2, block_size=64,
                       dtype="float32", rope_theta=10_000.0)


class Bench:
    def __init__(self, args):
        self.args = args
        self.tp, self.channel, self.device = init_tensor_parallel(args.device, args.tp_timeout)
        self.rank, self.size = self.tp.rank, self.tp.size
        self.cuda = self.device.type == "cuda"
        # one GPU: still run the (one-rank) NCCL collectives, so CUDA graphs capture them
        self.tp.always = self.cuda and self.size == 1 and not args.no_collectives
        self.rows: list[dict] = []

    # ------------------------------------------------------------------ helpers
    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def max_over_ranks(self, x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64)
        t = t.to(self.device) if self.cuda else t
        if self.size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def min_over_ranks(self, x: float) -> float:
        return -self.max_over_ranks(-x)

    def say(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    def run_records(self, engine, records) -> list[float]:
        """Each record through the step channel and the engine on every rank; per-step seconds
        on rank 0 (each step ends in a device sync, as the engine's sampling does)."""
        times = []
        for r in records:
            t0 = time.perf_counter()
            if self.rank == 0:
                self.channel.send(r)
            else:
                r = self.channel.recv()
            engine.run_step(r)
            self.sync()
            times.append(time.perf_counter() - t0)
        return times

    # ------------------------------------------------------------------ 1. correctness
    def check(self) -> bool:
        cfg = small_config(self.args.tiny)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.manual_seed(0)
        full = MiniMaxForCausalLM(cfg).eval().to(self.device)
        if self.args.quantization:
            quantize_model(full, self.args.quantization)
        model = parallelize_for_inference(full, self.tp, expert_parallel=self.args.expert_parallel)
        kw = dict(num_slots=4, max_context=256, prefill_chunk=48, cuda_graphs=self.cuda)
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist()
                   for n in (5, 70, 1, 33, 120, 9)]
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        engine = rank_engine(model, None, self.channel, self.rank, **kw)
        ok = torch.ones(1, dtype=torch.float64)
        if self.rank == 0:
            ref = Engine(full, **kw)
            lr, lt = [], []
            for eng, keep in ((ref, lr), (engine, lt)):
                inner = eng._sample
                eng._sample = (lambda inner, keep: lambda rows, logits:
                               (keep.append(logits.float().clone()), inner(rows, logits))[1]
                               )(inner, keep)
            want = [c.token_ids for c in ref.generate(prompts, params)]
            got = [c.token_ids for c in engine.generate(prompts, params)]
            self.channel.stop()
            err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(lt, lr))
            same = got == want and len(lt) == len(lr)
            ok[0] = float(same)
            self.rows.append(dict(what="greedy TP == TP 1 (small fp32-activation model)",
                                  value=f"{'identical' if same else 'DIFFERENT'} tokens, "
                                        f"{len(lt)} steps, logits max rel err {err:.1e}"))
            ref.close()
        else:
            follow(engine, self.channel)
        engine.close()
        del engine, model, full
        self.free()
        ok = ok.to(self.device) if self.cuda else ok
        if self.size > 1:
            dist.broadcast(ok, 0)
        torch.backends.cuda.matmul.allow_tf32 = True
        return bool(ok.item())

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ 2. the big model
    def build(self, cfg: ModelConfig):
        a = self.args
        t0 = time.perf_counter()
        meta = MiniMaxForCausalLM.from_config_on_meta(cfg)
        qc = resolve(a.quantization)
        if qc is not None:
            quantize_on_meta(meta, qc)
        rank = cast_model(parallelize_for_inference(meta, self.tp,
                                                    expert_parallel=a.expert_parallel),
                          None, getattr(torch, a.dtype))
        materialize_random(rank, self.device, seed=0)
        self.sync()
        if self.size > 1:
            dist.barrier()
        build = self.max_over_ranks(time.perf_counter() - t0)
        nbytes = sum(t.numel() * t.element_size() for t in
                     [*rank.parameters(), *rank.buffers()])
        self.rows.append(dict(what=f"build (random weights per rank, {cfg.num_hidden_layers} "
                                   f"layers)", value=f"{build:.1f} s"))
        self.rows.append(dict(what="weights per GPU (max over ranks)",
                              value=f"{self.max_over_ranks(nbytes) / GiB:.2f} GiB"))
        return rank.eval()

    def slot_bytes(self, cfg: ModelConfig, context: int) -> int:
        d = cfg.head_dim
        item = torch.empty((), dtype=getattr(torch, self.args.dtype)).element_size()
        lin = sum(t == LINEAR for t in cfg.layer_types)
        return (lin * cfg.num_attention_heads * d * d * 4
                + (cfg.num_hidden_layers - lin) * 2 * cfg.num_key_value_heads * context * d * item)

    def engine_for(self, model, context: int, want_slots: int):
        """An engine with up to `want_slots` sequences of `context` tokens (what fits on every
        rank, leaving room for one prefill chunk); None when not even one fits."""
        a = self.args
        if self.cuda:
            free, _ = torch.cuda.mem_get_info(self.device)
            room = free * 0.85 - 6 * GiB * min(1.0, a.prefill_chunk / 16384)
        else:
            room = 64 * GiB
        fit = int(self.min_over_ranks(room // max(self.slot_bytes(model.config, context + 64), 1)))
        slots = min(want_slots, fit - 1)
        if slots < 1:
            return None, 0
        eng = Engine(model, None, max_context=context + 64, num_slots=slots,
                     prefill_chunk=a.prefill_chunk, max_batch=slots, overlap=False,
                     cuda_graphs=self.cuda and not a.no_cuda_graphs)
        for t in [*eng.pool.keys.values(), *eng.pool.values.values()]:
            t.zero_()
        return eng, slots

    # ------------------------------------------------------------------ 3. decode
    def decode_records(self, vocab: int, batch: int, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        return [StepRecord(decode_tokens=torch.randint(0, vocab, (batch,), generator=g).tolist(),
                           decode_slots=list(range(batch)), decode_lengths=[0] * batch)
                for _ in range(n)]

    def time_decode(self, engine, batch: int, context: int) -> float:
        a = self.args
        engine.pool.lengths[:batch] = context - 1
        records = self.decode_records(engine.config.vocab_size, batch, a.warmup + a.iters, batch)
        for r in records:
            r.decode_lengths = [context - 1] * batch  # the torch attention path reads these
        times = self.run_records(engine, records)[a.warmup:]
        times.sort()
        return times[len(times) // 2]

    def with_skipped_collectives(self, engine, fn):
        """fn() with the communication skipped (fresh CUDA graphs, then fresh again after)."""
        self.tp.skip = True
        if engine.graphs is not None:
            engine.graphs = DecodeGraphs(engine.model, engine.cache, engine.scheduler.max_batch)
        try:
            return fn()
        finally:
            self.tp.skip = False
            if engine.graphs is not None:
                engine.graphs = DecodeGraphs(engine.model, engine.cache,
                                             engine.scheduler.max_batch)

    # ------------------------------------------------------------------ 4. prefill
    def prefill_records(self, vocab: int, length: int):
        chunk = self.args.prefill_chunk
        g = torch.Generator().manual_seed(length)
        out = []
        for start in range(0, length, chunk):
            n = min(chunk, length - start)
            out.append(StepRecord(prefill_ids=torch.randint(0, vocab, (n,), generator=g).tolist(),
                                  prefill_slots=[0], prefill_starts=[start],
                                  prefill_lengths=[n],
                                  prefill_keep=[n - 1] if start + n == length else []))
        return out

    def time_prefill(self, engine, length: int) -> float:
        engine.pool.reset(0)
        warm = self.prefill_records(engine.config.vocab_size, min(length, self.args.prefill_chunk))
        self.run_records(engine, warm)  # compiles / tunes at this chunk size
        engine.pool.reset(0)
        return sum(self.run_records(engine, self.prefill_records(engine.config.vocab_size,
                                                                 length)))

    # ------------------------------------------------------------------ the run
    def perf(self) -> None:
        a = self.args
        cfg = small_config(True).replace(num_hidden_layers=8,
                                         layer_types=hybrid_layer_types(8, 8)) \
            if a.tiny else text01(a.layers)
        model = self.build(cfg)
        cfg = model.config
        contexts = sorted(set(a.decode_contexts) | set(a.prefill_lengths))
        for c in contexts:
            want = max(a.batches) if c in a.decode_contexts else 1
            engine, slots = self.engine_for(model, c, want)
            if engine is None:
                self.rows.append(dict(what=f"context {c:,}", value="does not fit one sequence"))
                continue
            if c in a.decode_contexts:
                for b in a.batches:
                    label = f"decode step, batch {b}, {c:,} tokens each"
                    if b > slots:
                        self.rows.append(dict(what=label, value=f"does not fit ({slots} fit)"))
                        continue
                    t = self.time_decode(engine, b, c)
                    share = ""
                    biggest = max(x for x in a.batches if x <= slots)
                    if (self.size > 1 or self.tp.always) and b in (min(a.batches), biggest):
                        ts = self.with_skipped_collectives(engine,
                                                           lambda: self.time_decode(engine, b, c))
                        share = f", collectives {max(0.0, 1 - ts / t):.0%}"
                    self.rows.append(dict(what=label, value=f"{t * 1e3:.2f} ms{share}",
                                          ms=t * 1e3))
            if c in a.prefill_lengths:
                t = self.time_prefill(engine, c)
                share = ""
                if (self.size > 1 or self.tp.always) and c == min(a.prefill_lengths):
                    ts = self.with_skipped_collectives(engine, lambda: self.time_prefill(engine, c))
                    share = f", collectives {max(0.0, 1 - ts / t):.0%}"
                self.rows.append(dict(what=f"prefill {c:,} tokens",
                                      value=f"{c / t:,.0f} tok/s ({t:.1f} s){share}",
                                      tok_s=c / t))
            if self.cuda:
                peak = self.max_over_ranks(torch.cuda.max_memory_allocated(self.device))
                self.rows.append(dict(what=f"peak memory per GPU, context {c:,} x {slots}",
                                      value=f"{peak / GiB:.1f} GiB"))
                torch.cuda.reset_peak_memory_stats(self.device)
            engine.close()
            engine = None
            self.free()

    def report(self, ok: bool) -> None:
        if self.rank != 0:
            return
        a = self.args
        dev = torch.cuda.get_device_name(self.device) if self.cuda else "cpu"
        print(f"\ntensor parallel {self.size} x {dev}, {a.dtype}, "
              f"{a.quantization or 'no quantization'}"
              f"{', expert parallel' if a.expert_parallel else ''}; torch {torch.__version__}; "
              f"{datetime.date.today()}")
        width = max(len(r["what"]) for r in self.rows)
        for r in self.rows:
            print(f"  {r['what']:<{width}}  {r['value']}")
        print("correctness:", "OK" if ok else "FAILED")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(dict(tp=self.size, device=dev, args=vars(a), rows=self.rows, ok=ok), f,
                          indent=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cuda (GPU LOCAL_RANK) or cpu (gloo)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    p.add_argument("--layers", type=int, default=None,
                   help="Text-01 layers (default 80; fewer for 1-2 GPUs, a multiple of 8)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantization", default=None, choices=["int8", "fp8"])
    p.add_argument("--expert-parallel", action="store_true")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--decode-contexts", default="8192,1048576")
    p.add_argument("--prefill-lengths", default="8192,131072,1048576")
    p.add_argument("--prefill-chunk", type=int, default=16384)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--skip-perf", action="store_true", help="only the correctness check")
    p.add_argument("--no-collectives", action="store_true",
                   help="one GPU: skip the one-rank NCCL collectives (run by default so the "
                        "CUDA graphs capture them)")
    p.add_argument("--tp-timeout", type=float, default=600.0)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    a.batches, a.decode_contexts, a.prefill_lengths = (ints(a.batches), ints(a.decode_contexts),
                                                       ints(a.prefill_lengths))
    if a.tiny:
        a.dtype = "float32" if (a.device or "cpu") == "cpu" else a.dtype
        a.batches = [1, 4]
        a.decode_contexts = [64, 256]
        a.prefill_lengths = [64, 256]
        a.prefill_chunk = min(a.prefill_chunk, 96)
        a.warmup, a.iters = 1, 3
    ensure_env()
    world = int(os.environ["WORLD_SIZE"])
    if a.layers is None:
        a.layers = 80 if world >= 4 else 8
    if a.layers % 8:
        p.error("--layers must be a multiple of 8 (the 7:1 lightning:softmax pattern)")
    bench = Bench(a)
    ok = bench.check()
    if not a.skip_perf:
        bench.perf()
    bench.report(ok)
    finish_tensor_parallel(bench.tp)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
