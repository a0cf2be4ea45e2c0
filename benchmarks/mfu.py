"""MFU on one GPU (issue 16): where the `1b` train step spends its time, how fast it and slices
of MiniMax-Text-01 at their real widths train, and what a full step needs per GPU.

  a. profile   the `1b` step at 8K (before: autocast over fp32 weights + full recompute, the
               1b-8k preset; after: train.cast_weights = per_step and the lightest recompute
               that fits; with --compile also after with every decoder layer compiled), each
               profiled and attributed by model part (profile_scopes.py: ms, share and kernel
               count per pass and scope, kinds inside, top 15 kernels with their bucket, the
               Triton lightning kernels' rates), then timed unprofiled (tok/s, MFU)
  b. 1b        tokens/s and MFU at 4K / 8K / 16K / 64K context, 64K tokens per optimizer step
               (micro-batches of 8K tokens or one row), before and after; the hybrid spread
  c. slices    Text-01 widths (hidden 6144, 32 experts of 9216, 64 heads): `text01-4layer`
               (3 lightning + 1 softmax, packed 8K tokens, bf16 weights) forward+backward MFU;
               `text01-1layer` (1 lightning layer) full step with 64K tokens per optimizer step
               (8 micro-batches of 8K, AdamW over fp32 masters, clipping, per_step weight casts)
  d. memory    per-GPU memory of an 8-layer slice and of the full Text-01 train step under
               FSDP / EP (computed, not measured)

Correctness first: the step's loss is checked finite and, for the cast modes, the per_step step's
loss equals the autocast one within bf16 rounding. MFU counts `cfg.flops_per_token(T,
training=True)` (matmuls, 3x forward, recompute not counted) against the bf16 matmul rate
measured in the same run. Prints every number; writes $OUT/mfu.json when OUT is set.

    python benchmarks/mfu.py                      # one H200: all sections, < 8 minutes
    python benchmarks/mfu.py --tiny               # CPU smoke run (tiny shapes, no MFU)
    python benchmarks/mfu.py --only profile,slices
    python benchmarks/mfu.py --only 1b-8k --profile --compile both   # 1b at 8K, compile off/on
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import profile_scopes  # noqa: E402
from train_throughput import check_triton, force_lightning_backend, matmul_peak  # noqa: E402

from minimax01 import MiniMaxForCausalLM, ModelConfig  # noqa: E402
from minimax01.config import FULL, LINEAR  # noqa: E402
from minimax01.train.config import OptimConfig  # noqa: E402
from minimax01.train.optim import build_optimizer  # noqa: E402
from minimax01.train.precision import StepCastWeights  # noqa: E402
from minimax01.train.recompute import apply_recompute  # noqa: E402

K = 1024
TEXT01 = dict(hidden_size=6144, intermediate_size=9216, num_attention_heads=64,
              num_key_value_heads=8, head_dim=128, rotary_dim=64, num_local_experts=32,
              num_experts_per_tok=2, block_size=256, vocab_size=32768, postnorm=True)
# benchmark presets: slices of MiniMax-Text-01 at its real widths (vocab cut to 32K so the
# 1-layer slice's fp32 masters + AdamW fit one GPU; the embeddings are not what is measured)
SLICES = {
    "text01-4layer": dict(TEXT01, num_hidden_layers=4, layer_types=[LINEAR] * 3 + [FULL]),
    "text01-1layer": dict(TEXT01, num_hidden_layers=1, layer_types=[LINEAR]),
}
TINY = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, rotary_dim=8, num_local_experts=4, num_experts_per_tok=2, block_size=16,
            vocab_size=512)


def log(*a):
    print(*a, flush=True)


def slice_config(name: str, tiny: bool) -> ModelConfig:
    fields = dict(SLICES[name])
    if tiny:
        fields.update(TINY)
    return ModelConfig(**fields)


def one_b(tiny: bool) -> ModelConfig:
    if tiny:
        return ModelConfig.from_preset("1b").replace(num_hidden_layers=4, **TINY)
    return ModelConfig.from_preset("1b")


# ------------------------------------------------------------------------------ one step
class Step:
    """One optimizer step as the trainer takes it: micro-batches of packed documents under
    autocast, the aux loss, fp32 clipping (fused norm) and fused AdamW over fp32 masters.
    `cast`: "per_use" (autocast over fp32 weights) | "per_step" (StepCastWeights) | "bf16"
    (bf16 weights, no optimizer: forward+backward only)."""

    def __init__(self, cfg, device, cast: str, recompute: str, backend: str, chunk: int,
                 compile: bool = False):
        torch.manual_seed(0)
        dtype = torch.bfloat16 if cast == "bf16" else torch.float32
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # never materialise an fp32 copy of a bf16 slice
        try:
            with torch.device(device):
                self.model = MiniMaxForCausalLM(cfg).to(dtype).train()
        finally:
            torch.set_default_dtype(default)
        apply_recompute(self.model, recompute)
        force_lightning_backend(self.model, backend)
        if compile:  # as the trainer does (train.compile): every decoder layer
            for layer in self.model.model.layers:
                layer.compile()
        self.compiled = compile
        self.cast = StepCastWeights(self.model, torch.bfloat16) if cast == "per_step" else None
        self.opt = None if cast == "bf16" else build_optimizer(self.model, OptimConfig())
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.cfg, self.device, self.chunk = cfg, device, chunk

    def batches(self, tokens: int, seq: int, micro_tokens: int):
        """Micro-batches of `micro_tokens` (at least one row of `seq`) covering `tokens`, each
        one packed row of documents of length `seq`."""
        micro_tokens = max(micro_tokens, seq)
        g = torch.Generator().manual_seed(1)
        out = []
        for _ in range(max(tokens // micro_tokens, 1)):
            ids = torch.randint(0, self.cfg.vocab_size, (1, micro_tokens), generator=g)
            cu = torch.arange(0, micro_tokens + 1, seq, dtype=torch.int32)
            out.append((ids.to(self.device), cu.to(self.device)))
        return out

    def __call__(self, batches) -> torch.Tensor:
        from torch.profiler import record_function

        cuda = self.device.type == "cuda"
        if self.cast is not None:
            self.cast.begin()
        total = torch.zeros((), device=self.device)
        with record_function("forward+backward"):
            for ids, cu in batches:
                with torch.autocast(self.device.type, dtype=torch.bfloat16):
                    out = self.model(ids, labels=ids, cu_seqlens=cu, loss_chunk_size=self.chunk)
                loss = (out.lm_loss + self.cfg.router_aux_loss_coef * out.aux_loss) / len(batches)
                loss.backward()
                total += loss.detach()
        if self.cast is not None:
            self.cast.end()
        if self.opt is not None:
            with record_function("clip"):
                torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=cuda or None)
            with record_function("optimizer"):
                self.opt.step()
        self.model.zero_grad(set_to_none=True)
        return total

    def close(self):
        if self.cast is not None:
            self.cast.remove()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step: Step, batches, steps: int) -> tuple[float, float]:
    """(seconds per step, peak GiB); one warm-up step first (compiles, autotunes)."""
    loss = step(batches)
    if not torch.isfinite(loss):
        raise AssertionError(f"non-finite loss {loss}")
    sync(step.device)
    if step.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        step(batches)
    sync(step.device)
    dt = (time.perf_counter() - t) / steps
    mem = torch.cuda.max_memory_allocated() / 2**30 if step.device.type == "cuda" else 0.0
    return dt, mem


def free(device):
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ a. profile
def lightning_work(cfg: ModelConfig, tokens: int) -> dict[str, tuple[float, float]]:
    """Nominal work of ONE Triton lightning launch over a layer's `tokens` (bf16): a causal
    scan computes per token and head the intra-block products 2 B (D + E) (the whole block, as
    the kernel does) and the inter-block / state products 4 D E, and moves q, k, v in and o out.
    Backward launches are taken at the same nominal work (a dq scan is exactly that; the fused
    dk/dv launch does twice it: its rate reads 2x low)."""
    b, d = cfg.block_size, cfg.head_dim
    flops = tokens * cfg.num_attention_heads * (2 * b * (d + d) + 4 * d * d)
    nbytes = tokens * cfg.num_attention_heads * 4 * d * 2
    return {"fwd": (flops, nbytes), "bwd": (flops, nbytes), "recompute": (flops, nbytes)}


def profile_step(step: Step, batches, steps: int) -> dict:
    """Profile `steps` steps (after one warm-up) with the model's parts labelled from outside
    (profile_scopes.py): per bucket (pass, scope) ms per step, share and kernel count, the top 15
    kernels with their bucket, and the Triton lightning kernels' rates."""
    from torch.profiler import ProfilerActivity, profile

    cuda = step.device.type == "cuda"
    with profile_scopes.label_model(step.model, inside_layers=not step.compiled):
        step(batches)  # warm-up (under the labels: compiled graphs see the same hooks)
        sync(step.device)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            for _ in range(steps):
                step(batches)
            sync(step.device)
    rows, total = profile_scopes.attribute(prof, cuda)
    s = profile_scopes.summarise(rows, total, steps)
    tokens = batches[0][0].numel()
    s["lightning"] = profile_scopes.lightning_rates(rows, steps, lightning_work(step.cfg, tokens))
    return s


def print_profile(name: str, p: dict) -> None:
    log(f"\n[{name}]")
    profile_scopes.print_summary(p, log)
    if p["lightning"]:
        log("  Triton lightning kernels (nominal work of one causal scan per launch):")
        for r in p["lightning"]:
            log(f"    {r['passname']:9s} {r['name']:40s} {r['ms']:8.2f} ms/step "
                f"{r['launches']:4d} launches {r['us_per_launch']:8.1f} us  "
                f"{r['tflops']:6.1f} TFLOP/s {r['gbps']:7.0f} GB/s")


def compare_profiles(profiles: dict[str, dict]) -> None:
    """Scopes (all passes) side by side, ms per step."""
    names = list(profiles)
    scopes = []
    for p in profiles.values():
        scopes += [k for k in p["scopes"] if k not in scopes]
    log("\n  ms per step by scope: " + " | ".join(names))
    for sc in scopes:
        log(f"    {sc:22s} " + " | ".join(f"{profiles[n]['scopes'].get(sc, 0.0):9.1f}"
                                          for n in names))
    log(f"    {'total':22s} " + " | ".join(f"{profiles[n]['total_ms']:9.1f}" for n in names))
    kinds = []
    for p in profiles.values():
        kinds += [k for k in p["kinds"] if k not in kinds]
    log("  ms per step by kind:  " + " | ".join(names))
    for k in kinds:
        log(f"    {k:22s} " + " | ".join(f"{profiles[n]['kinds'].get(k, 0.0):9.1f}"
                                         for n in names))


# ------------------------------------------------------------------------------ d. memory
def step_memory(cfg: ModelConfig, gpus: int, ep: int, tokens_per_gpu: int,
                recompute: str = "full") -> dict[str, float]:
    """Bytes per GPU of one train step under FSDP over `gpus` ranks with experts split over
    `ep` of them (and FSDP-sharded over gpus / ep): fp32 masters + fp32 grads + AdamW's two
    fp32 moments (16 B per parameter, everything sharded over all ranks), one layer's gathered
    bf16 weights (dense part, and this EP rank's experts) twice (prefetch), and activations
    (bf16; the layer inputs kept under full recompute plus one layer's full activations, or
    every layer's with no recompute). An estimate for planning, not a measurement."""
    h, i, e, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok
    layers = cfg.num_hidden_layers
    params = cfg.num_parameters()
    experts_per_layer = 3 * e * h * i
    dense_per_layer = (params - cfg.vocab_size * h * 2) / layers - experts_per_layer
    states = 16 * params / gpus
    gathered = 2 * 2 * (dense_per_layer + experts_per_layer / ep)
    # activations of one layer per token (bf16): norms / residuals (~10 H), attention
    # projections (~4 attention widths), the routed rows' input, gate/up and product (k (2H + 3I))
    per_token_layer = 2 * (10 * h + 4 * cfg.attn_width + k * (2 * h + 3 * i))
    if recompute == "full":
        acts = tokens_per_gpu * (2 * h * layers + per_token_layer)
    else:
        acts = tokens_per_gpu * per_token_layer * layers
    logits = 4 * 8192 * cfg.vocab_size * 2  # one fp32 loss chunk and its gradient
    total = states + gathered + acts + logits
    return {"states": states, "gathered weights": gathered, "activations": acts,
            "logits": logits, "total": total}


def memory_section(tiny: bool) -> list[dict]:
    full = ModelConfig.from_preset("minimax-text-01")
    eight = full.replace(num_hidden_layers=8)
    rows = []
    log("\n[d] per-GPU memory of a train step (computed: 16 B/param states sharded over all "
        "GPUs, one layer's bf16 weights gathered x2, bf16 activations, full recompute)")
    log("| model | GPUs | EP | tokens/GPU | states GiB | gathered GiB | activations GiB | "
        "total GiB |")
    log("|---|---|---|---|---|---|---|---|")
    for name, cfg, layouts in (("Text-01 8-layer slice", eight, [(8, 8), (16, 8), (32, 16)]),
                               ("Text-01 (80 layers)", full, [(64, 8), (128, 16), (256, 32),
                                                             (512, 32)])):
        for gpus, ep in layouts:
            m = step_memory(cfg, gpus, ep, 8192)
            rows.append(dict(model=name, gpus=gpus, ep=ep, tokens_per_gpu=8192,
                             **{k: v / 2**30 for k, v in m.items()}))
            log(f"| {name} | {gpus} | {ep} | 8K | {m['states'] / 2**30:.1f} | "
                f"{m['gathered weights'] / 2**30:.1f} | {m['activations'] / 2**30:.1f} | "
                f"{m['total'] / 2**30:.1f} |")
    return rows


# ------------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run)")
    ap.add_argument("--only", default="profile,1b,slices,memory")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per measurement")
    ap.add_argument("--profile", action="store_true",
                    help="with --only 1b-8k: profile each run too (--only profile implies it)")
    ap.add_argument("--compile", choices=("off", "on", "both"), default="off",
                    help="torch.compile of every decoder layer (train.compile) for the 1b step "
                         "at 8K: off, on (before eager + after compiled), both (after eager "
                         "and compiled)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    tiny = args.tiny or not cuda
    result: dict = {"torch": torch.__version__, "card": torch.cuda.get_device_name() if cuda
                    else "cpu", "tiny": tiny}
    peak = matmul_peak() if cuda else float("nan")
    result["matmul_tflops"] = peak / 1e12
    log(f"torch {torch.__version__}, {result['card']}, measured bf16 matmul "
        f"{peak / 1e12:.0f} TFLOP/s{' (tiny shapes)' if tiny else ''}")
    backend = "chunk"
    if cuda:
        probe = MiniMaxForCausalLM(ModelConfig.from_preset("debug")).to(device)
        backend = check_triton(probe)
        del probe
    result["lightning_backend"] = backend
    seq8 = 128 if tiny else 8 * K
    step_tokens = 512 if tiny else 64 * K
    chunk = 0 if tiny else 8192
    start = time.perf_counter()
    attn = contextlib.nullcontext()
    if cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        attn = sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                            SDPBackend.EFFICIENT_ATTENTION], set_priority=True)

    def mfu(cfg, seq, tokens, dt):
        return cfg.flops_per_token(seq, training=True) * tokens / dt / peak

    def build_fitting(cfg, cast, policies, batches_fn, compiled=False):
        """The first recompute policy of `policies` whose step fits (OOM: the next)."""
        for policy in policies:
            step = None
            try:
                step = Step(cfg, device, cast, policy, backend, chunk, compiled)
                batches = batches_fn(step)
                loss = step(batches)
                if not torch.isfinite(loss):
                    raise AssertionError(f"{cast}/{policy}: non-finite loss {loss}")
                return step, batches, policy, float(loss)
            except torch.OutOfMemoryError:
                log(f"  {cast} recompute={policy}: out of memory, trying the next policy")
            # here the exception (and the frames holding the step) are gone: free it all
            if step is not None:
                step.close()
            step = batches = None
            free(device)
        raise RuntimeError(f"no recompute policy of {policies} fits")

    configs = {"before": ("per_use", ["full"]),
               "after": ("per_step", ["none", "attention", "moe", "full"])}
    with attn:
        # ---------------------------------------------------------------- a. profile
        if "profile" in only or "1b-8k" in only:
            # the 1b step at 8K: before / after (eager), after compiled (--compile); each
            # profiled (with --profile or --only profile) and timed unprofiled
            cfg = one_b(tiny)
            result["profile"] = {}
            losses = {}
            runs = [(n, c, pol, False) for n, (c, pol) in configs.items()
                    if args.compile != "on" or n == "before"]
            if args.compile in ("on", "both"):
                runs.append(("after+compile", *configs["after"], True))
            for name, cast, policies, compiled in runs:
                t0 = time.perf_counter()
                step, batches, policy, losses[name] = build_fitting(
                    cfg, cast, policies, lambda s: s.batches(step_tokens, seq8, seq8), compiled)
                first = time.perf_counter() - t0
                entry = dict(cast=cast, recompute=policy, compile=compiled, loss=losses[name],
                             build_and_first_step_s=first)
                if "profile" in only or args.profile:
                    p = profile_step(step, batches, 1)
                    entry.update(p)
                    print_profile(f"a. 1b at {seq8} tokens, {step_tokens} tokens/step, {name}: "
                                  f"{cast}, recompute {policy}, compile {compiled}", p)
                dt, mem = timed(step, batches, args.steps)
                m = mfu(cfg, seq8, step_tokens, dt)
                entry.update(step_s=dt, tokens_per_s=step_tokens / dt, mfu=m, peak_gib=mem)
                result["profile"][name] = entry
                log(f"a. 1b {name:13s} ({cast}, recompute {policy}, compile {compiled}) "
                    f"T={seq8}: {step_tokens / dt:9.0f} tok/s  MFU {100 * m:5.1f}%  "
                    f"step {1e3 * dt:7.1f} ms  peak {mem:5.1f} GiB  first step "
                    f"{first:5.1f} s  loss {losses[name]:.5f}  [{time.perf_counter() - start:.0f}s]")
                step.close()
                del step, batches
                free(device)
            profiled = {n: p for n, p in result["profile"].items() if "scopes" in p}
            if len(profiled) > 1:
                compare_profiles(profiled)
            base = losses[runs[0][0]]
            for name, loss in losses.items():
                rel = abs(loss - base) / abs(base)
                log(f"  first-step loss {name} {loss:.5f} vs {runs[0][0]} {base:.5f} "
                    f"(relative difference {rel:.1e}; bf16 rounding allows ~1e-2)")
                if rel > 5e-2:
                    raise AssertionError(f"{name} changed the loss beyond bf16 rounding")
            log(f"  [{time.perf_counter() - start:.0f}s]")
        # ---------------------------------------------------------------- b. 1b throughput
        if "1b" in only:
            cfg = one_b(tiny)
            seqs = [128, 256, 512] if tiny else [4 * K, 8 * K, 16 * K, 64 * K]
            rows = []
            for name, (cast, policies) in configs.items():
                for seq in seqs:
                    micro = max(seq, seq8)
                    step, batches, policy, _ = build_fitting(
                        cfg, cast, policies, lambda s: s.batches(step_tokens, seq, micro))
                    dt, mem = timed(step, batches, args.steps)
                    tps = step_tokens / dt
                    m = mfu(cfg, seq, step_tokens, dt)
                    rows.append(dict(config=name, cast=cast, recompute=policy, seq=seq,
                                     tokens_per_s=tps, mfu=m, peak_gib=mem))
                    log(f"b. 1b {name:6s} ({cast}, recompute {policy:9s}) T={seq:6d}: "
                        f"{tps:9.0f} tok/s  MFU {100 * m:5.1f}%  peak {mem:5.1f} GiB  "
                        f"[{time.perf_counter() - start:.0f}s]")
                    step.close()
                    del step, batches
                    free(device)
                tps = [r["tokens_per_s"] for r in rows if r["config"] == name]
                log(f"   {name}: hybrid spread {seqs[0]}..{seqs[-1]}: "
                    f"{100 * (max(tps) - min(tps)) / max(tps):.1f}% (goal <= 10%)")
            result["1b"] = rows
        # ---------------------------------------------------------------- c. slices
        if "slices" in only:
            result["slices"] = {}
            cfg = slice_config("text01-4layer", tiny)
            step = Step(cfg, device, "bf16", "none", backend, chunk)
            batches = step.batches(seq8, seq8, seq8)
            dt, mem = timed(step, batches, args.steps)
            m = mfu(cfg, seq8, seq8, dt)
            result["slices"]["text01-4layer"] = dict(ms=dt * 1e3, mfu=m, peak_gib=mem)
            log(f"c. text01-4layer fwd+bwd, bf16 weights, packed {seq8}: {dt * 1e3:.1f} ms, "
                f"MFU {100 * m:.1f}% (goal >= 60%), peak {mem:.1f} GiB  "
                f"[{time.perf_counter() - start:.0f}s]")
            del step, batches
            free(device)
            cfg = slice_config("text01-1layer", tiny)
            step, batches, policy, _ = build_fitting(
                cfg, "per_step", ["none", "moe", "full"],
                lambda s: s.batches(step_tokens, seq8, seq8))
            dt, mem = timed(step, batches, args.steps)
            m = mfu(cfg, seq8, step_tokens, dt)
            result["slices"]["text01-1layer"] = dict(ms=dt * 1e3, mfu=m, peak_gib=mem,
                                                     recompute=policy)
            log(f"c. text01-1layer full step, {step_tokens} tokens ({len(batches)} x {seq8}), "
                f"per_step casts, AdamW + clip, recompute {policy}: {dt * 1e3:.1f} ms, "
                f"MFU {100 * m:.1f}% (goal >= 50%), peak {mem:.1f} GiB")
            if "profile" in only or tiny:
                p = profile_step(step, batches, 1)
                result["slices"]["text01-1layer"]["profile"] = p
                print_profile("c. text01-1layer full step", p)
            step.close()
            del step, batches
            free(device)
            log(f"  [{time.perf_counter() - start:.0f}s]")
        if "memory" in only:
            result["memory"] = memory_section(tiny)
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "mfu.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
        log(f"wrote {os.path.join(out, 'mfu.json')}")
    log(f"done in {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
