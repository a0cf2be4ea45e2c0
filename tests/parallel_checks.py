"""Distributed == single process, checked on the machine at hand (test code: tests/test_parallel_*
run these on gloo; on GPUs run this file with torchrun).

Each check runs inside an initialised process group (every rank calls it), computes the
single-process reference on its own device, and raises AssertionError when the distributed
result differs by more than `tol` (relative to the reference's size). The CPU tests run them on
gloo in float64; on GPUs they run with NCCL:

    torchrun --nproc_per_node 2 tests/parallel_checks.py      # all checks, 2 (or 4) ranks
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

if __name__ == "__main__":  # run as a script from a checkout: import this checkout's package
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minimax01.ops import lightning_attn
from minimax01.ops.attention import causal_attention
from minimax01.parallel.batch import local_cu_seqlens, next_token_targets
from minimax01.parallel.context import CPContext
from minimax01.parallel.lasp import lasp_lightning_attn
from minimax01.parallel.ring_attention import allgather_attention, ring_attention


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(max |b|, tiny)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _expect(name: str, err: float, tol: float) -> float:
    if not err <= tol:
        raise AssertionError(f"{name}: relative error {err:.3e} > {tol:.1e}")
    return err


def _positions(starts: list[int], total: int) -> torch.Tensor:
    pos, cur = [], 0
    sset = set(starts)
    for i in range(total):
        cur = 0 if (i in sset or i == 0) else cur + 1
        pos.append(cur)
    return torch.tensor(pos)


# ---------------------------------------------------------------------- attention pieces
def check_lasp(starts: list[int], *, per_rank: int = 8, heads: int = 3, dim: int = 4,
               device="cpu", dtype=torch.float64, tol: float = 1e-9, backend=None,
               seed: int = 0) -> float:
    """LASP+ on the world group vs the single-device op: output and q/k/v gradients."""
    rank, size, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    t = per_rank * size
    g = torch.Generator().manual_seed(seed)
    q, k, v = (0.5 * torch.randn(1, t, heads, dim, generator=g, dtype=torch.float64)
               for _ in range(3))
    slope = torch.linspace(0.05, 1.0, heads, dtype=torch.float64).to(device, torch.float32)
    q, k, v = (x.to(device, dtype) for x in (q, k, v))
    cu = torch.tensor(sorted(set(starts) | {0}) + [t], dtype=torch.int32, device=device)
    ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
    ref, _ = lightning_attn(*ref_in, slope, cu_seqlens=cu, backend=backend)
    up = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1),
                     dtype=torch.float64).to(device, dtype)
    (ref.float() * up.float()).sum().backward()
    sl = slice(rank * per_rank, (rank + 1) * per_rank)
    ctx = CPContext.gather(group, rank, size, _positions(starts, t)[sl][None].to(device))
    local = [x[:, sl].clone().requires_grad_() for x in (q, k, v)]
    o, _ = lasp_lightning_attn(*local, slope, cu_seqlens=local_cu_seqlens(cu, sl.start, sl.stop),
                               ctx=ctx, backend=backend)
    (o.float() * up[:, sl].float()).sum().backward()
    err = rel_err(o, ref[:, sl])
    for a, b in zip(local, ref_in):
        err = max(err, rel_err(a.grad, b.grad[:, sl]))
    return _expect(f"LASP+ {starts}", err, tol)


def check_ring(starts: list[int], *, per_rank: int = 8, heads: int = 4, kv_heads: int = 2,
               dim: int = 8, device="cpu", dtype=torch.float64, tol: float = 1e-9,
               kernel: str = "math", mode: str = "balanced", seed: int = 0, rows: int = 1) -> float:
    """Ring (or all-gather) attention on the world group vs single-device causal document
    attention: output and q/k/v gradients. `rows` > 1: unpacked rows, one document each."""
    rank, size, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    t = per_rank * size
    g = torch.Generator().manual_seed(seed)
    shapes = [(rows, t, heads, dim), (rows, t, kv_heads, dim), (rows, t, kv_heads, dim)]
    q, k, v = (torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype) for s in shapes)
    scale = dim ** -0.5
    if rows > 1:
        starts = [0]
    cu = torch.tensor(sorted(set(starts) | {0}) + [t], dtype=torch.int32, device=device)
    wide = torch.float64 if dtype == torch.float64 else torch.float32  # reference precision
    ref_in = [x.to(wide, copy=True).requires_grad_() for x in (q, k, v)]
    ref = causal_attention(*ref_in, cu_seqlens=cu if rows == 1 else None, scale=scale)
    up = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1),
                     dtype=torch.float64).to(device, dtype)
    (ref.float() * up.float()).sum().backward()
    sl = slice(rank * per_rank, (rank + 1) * per_rank)
    ctx = CPContext.from_starts(starts, rank, size, per_rank, rows=rows, group=group)
    local = [x[:, sl].clone().requires_grad_() for x in (q, k, v)]
    if mode == "allgather":
        o = allgather_attention(*local, ctx=ctx, scale=scale)
    else:
        o = ring_attention(*local, ctx=ctx, scale=scale, kernel=kernel,
                           balance=mode == "balanced")
    (o.float() * up[:, sl].float()).sum().backward()
    err = rel_err(o, ref[:, sl])
    for a, b in zip(local, ref_in):
        err = max(err, rel_err(a.grad, b.grad[:, sl]))
    return _expect(f"ring {mode}/{kernel} {starts}", err, tol)


# ---------------------------------------------------------------------- the whole model
def check_model(pcfg, *, capacity_factor=None, pre_shifted: bool = True, loss_chunk_size: int = 0,
                preset: str = "debug", seq: int = 24, docs=(0, 5, 14, 15), device=None,
                dtype=torch.float64, tol: float = 1e-5, checkpointing: bool = False,
                **model_overrides) -> float:
    """The model under DistributedWorld(pcfg) vs one process on the concatenated batch: the
    loss (as the trainer forms it), the aux loss, MoE drops and every parameter's gradient."""
    from torch.distributed.tensor import DTensor

    from minimax01.config import ModelConfig
    from minimax01.model.model import MiniMaxForCausalLM
    from minimax01.parallel.parallelize import parallelize
    from minimax01.parallel.world import make_world

    def build():
        torch.manual_seed(0)
        cfg = ModelConfig.from_preset(preset, capacity_factor=capacity_factor,
                                      router_aux_loss_coef=0.01, **model_overrides)
        model = MiniMaxForCausalLM(cfg).to(dtype).train()
        model.set_gradient_checkpointing(checkpointing)  # recomputation repeats the collectives
        return model

    world = make_world(pcfg, device)
    dev = world.device
    rows = world.dp_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (rows, seq), generator=g).to(dev)
    labels = ids.clone()
    labels[:, 7] = -100
    cu = torch.tensor(list(docs) + [seq], dtype=torch.int32, device=dev)

    ref_model = build().to(dev)
    cu_all = torch.cat([cu[:-1] + r * seq for r in range(rows)] + [cu[-1:] * rows]).int()
    ref = ref_model(ids.reshape(1, -1), labels=labels.reshape(1, -1), cu_seqlens=cu_all,
                    loss_chunk_size=loss_chunk_size)
    ref.loss.backward()
    ref_grads = {n: p.grad for n, p in ref_model.named_parameters()}
    ref_dropped = [s.dropped for s in ref_model.moe_stats()]

    model = parallelize(build(), world, pcfg)
    mine = slice(world.dp_rank, world.dp_rank + 1)
    batch = dict(input_ids=ids[mine], labels=labels[mine], cu_seqlens=cu)
    if pre_shifted:  # the trainer's convention: labels are next-token targets already
        batch.update(labels=next_token_targets(labels[mine], cu), shift_labels=False)
    local = world.shard_batch(batch)
    out = model(**local, loss_chunk_size=loss_chunk_size)
    shifted = not local.get("shift_labels", True)
    targets = local["labels"] if shifted else next_token_targets(local["labels"],
                                                                 local.get("cu_seqlens"))
    n = targets.ne(-100).sum()
    n_global = world.all_reduce(n, "sum")
    lm = torch.where(n > 0, out.lm_loss, torch.zeros_like(out.lm_loss))
    loss = world.loss_scale.rank_loss(lm * n, n_global, out.aux_loss)  # as the trainer does
    loss.backward()
    err = rel_err(world.all_reduce(loss.detach(), "mean"), ref.loss)
    aux = world.loss_scale.mean_aux(world.all_reduce(out.aux_loss.detach(), "sum"))
    err = max(err, rel_err(aux, ref.aux_loss))
    dropped = [s.dropped for s in model.moe_stats()]
    ref_norm = torch.linalg.vector_norm(torch.stack([g.double().norm() for g in ref_grads.values()]))
    norm = world.clip_grad_norm_(list(model.parameters()), float("inf"))
    err = max(err, rel_err(norm, ref_norm))
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        err = max(err, rel_err(grad, ref_grads[name]))
    world.clip_grad_norm_(list(model.parameters()), float(ref_norm) / 2)  # clipping halves it
    err = max(err, rel_err(world.clip_grad_norm_(list(model.parameters()), float("inf")),
                           ref_norm / 2))
    dist.barrier()
    if dropped != ref_dropped:
        raise AssertionError(f"dropped assignments per layer {dropped} != {ref_dropped}")
    if capacity_factor is not None and not sum(ref_dropped):
        raise AssertionError("the token-drop case dropped nothing (the check would be vacuous)")
    return _expect(f"model {pcfg}", err, tol)


# ---------------------------------------------------------------------- command line
def run_all(device, dtype, tol_attn: float, tol_model: float, kernel: str = "math"):
    """Every check that fits the world size (2 or 4 ranks). Returns (report lines, failures)."""
    from minimax01.parallel.config import ParallelConfig

    size = dist.get_world_size()
    lines, failures = [], []

    def record(name, fn):
        t0 = time.perf_counter()
        try:
            err = fn()
        except AssertionError as e:
            failures.append(f"{name}: {e}")
            lines.append(f"{name:<46} FAILED: {e}")
            return
        lines.append(f"{name:<46} max rel err {err:.2e}  ({time.perf_counter() - t0:.1f} s)")

    for starts in ([0], [0, 5, 13], [0, 8], [0, 3, 8, 9, 15]):
        record(f"LASP+ docs {starts}", lambda: check_lasp(starts, device=device, dtype=dtype,
                                                          tol=tol_attn))
    for starts, mode in (([0, 3, 11, 12], "balanced"), ([0, 8], "contiguous"),
                         ([0, 6, 7], "allgather")):
        record(f"ring {mode}/{kernel} docs {starts}",
               lambda: check_ring(starts, device=device, dtype=dtype, tol=tol_attn, kernel=kernel,
                                  mode=mode))
    if device.type == "cuda":  # the fused flash kernel needs bf16
        for starts in ([0, 3, 11, 12], [0, 8]):
            record(f"ring balanced/flash bf16 docs {starts}",
                   lambda: check_ring(starts, device=device, dtype=torch.bfloat16, tol=5e-2,
                                      kernel="flash", per_rank=64, dim=64))
    cases = [("FSDP dp_shard", ParallelConfig(dp_shard=size), None, 0),
             ("EP dropless", ParallelConfig(ep=2), None, 0),
             ("EP token drop, 2 token groups", ParallelConfig(ep=2, ep_token_groups=2), 1.0, 0),
             ("CP (LASP+ and ring), chunked loss", ParallelConfig(cp=2), None, 8),
             ("CP + EP token drop", ParallelConfig(cp=2, ep=2), 1.0, 0),
             ("ETP (expert intermediate dim split)", ParallelConfig(etp=2), None, 0)]
    record("model: CP + EP, activation checkpointing",
           lambda: check_model(ParallelConfig(cp=2, ep=2), device=device, dtype=dtype,
                               tol=tol_model, checkpointing=True))
    if size == 4:
        cases.append(("dp 2 x CP 2 x EP 2 token drop",
                      ParallelConfig(dp_shard=2, cp=2, ep=2, ep_token_groups=2), 1.0, 0))
        cases.append(("EP 2 x ETP 2 token drop, 2 token groups",
                      ParallelConfig(ep=2, etp=2, ep_token_groups=2), 1.0, 0))
    for name, pcfg, cf, chunk in cases:
        record(f"model: {name}", lambda: check_model(pcfg, capacity_factor=cf, device=device,
                                                     dtype=dtype, tol=tol_model,
                                                     loss_chunk_size=chunk))
    return lines, failures


def main() -> int:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.float32 if cuda else torch.float64
    # GPU: fp32 data, but Triton dots may run in TF32; a real bug gives errors of order 1
    tol_attn, tol_model = (5e-3, 1e-2) if cuda else (1e-9, 1e-6)
    lines, failures = run_all(device, dtype, tol_attn, tol_model)
    if dist.get_rank() == 0:
        verdict = f"{len(failures)} FAILED" if failures else "all checks passed"
        print(f"selfcheck: {dist.get_world_size()} ranks, {dist.get_backend()}, {device.type}, "
              f"torch {torch.__version__}: {verdict}")
        print("\n".join(lines), flush=True)
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
