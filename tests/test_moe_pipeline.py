"""The one MoE pipeline (ops/moe.py) and its configurations.

* training (default), expert parallel (run here in one process: a router group of one rank and
  token groups take the general plan path), serving (sync-free; the dense and the grouped
  matmul) compute the same function as a per-token reference: outputs, aux loss, gradients;
* token drop keeps the GShard priority, whatever the token groups;
* serving is sync-free: it runs on meta tensors (where any host read raises) and refuses what
  needs the host (a capacity);
* the seams: another experts module (quantised weights) and tensor-parallel partial sums with a
  `reduce` plug in without touching the model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minimax01 import ModelConfig
from minimax01.model.layers import MoE
from minimax01.ops.moe import (SERVING, TRAINING, MoEPipeline, RouterGroup, dispatch, plan,
                               route)

CONFIGS = {
    "training": TRAINING,
    "expert-parallel (1 rank, 3 token groups)": MoEPipeline(router=RouterGroup(), token_groups=3),
    "serving (dense)": SERVING,
    "serving (grouped_mm)": MoEPipeline(sync_free=True, aux_loss=False, matmul="grouped"),
    "sync-free with the aux loss": MoEPipeline(sync_free=True),
}


def _moe(dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("debug", **overrides)
    moe = MoE(cfg).to(dtype)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    return moe


def _reference(moe, x):
    """Every token through its top-k experts, one at a time, weighted (float64; the router
    in fp32, SPEC §5)."""
    flat = x.reshape(-1, x.shape[-1]).double()
    probs = torch.softmax((x.reshape(flat.shape) @ moe.gate.weight.t()).float(), -1)
    w, idx = probs.topk(moe.top_k, -1)
    w = (w / w.sum(-1, keepdim=True)).double()
    probs = probs.double()
    i = moe.experts.down_proj.shape[-1]
    out = torch.zeros_like(flat)
    for n in range(flat.shape[0]):
        for j in range(moe.top_k):
            gu, down = moe.experts.gate_up_proj[idx[n, j]].double(), moe.experts.down_proj[idx[n, j]].double()
            h = gu @ flat[n]
            out[n] += w[n, j] * (down @ (F.silu(h[:i]) * h[i:]))
    f = torch.stack([(idx == e).sum().double() for e in range(moe.num_experts)]) / flat.shape[0]
    aux = moe.num_experts * (f * probs.mean(0)).sum()
    return out.reshape(x.shape), aux


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_configuration_computes_the_reference(name):
    pipeline = CONFIGS[name]
    dtype = torch.float32 if pipeline.matmul == "grouped" else torch.float64  # _grouped_mm: fp32
    moe = _moe(dtype).eval()
    x = torch.randn(3, 7, moe.gate.in_features, dtype=dtype,
                    generator=torch.Generator().manual_seed(1))
    want, want_aux = _reference(moe, x)
    moe.pipeline = pipeline
    with torch.no_grad():
        out, aux = moe(x)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    if pipeline.aux_loss:
        torch.testing.assert_close(aux.double(), want_aux, rtol=1e-6, atol=0)  # fp32 router
    else:
        assert float(aux) == 0.0  # serving: no load-balancing loss
    if pipeline.sync_free:
        assert moe.last_stats is None  # statistics would need the host
    else:
        assert moe.last_stats.dropped == 0 and moe.last_stats.assignments == 42
        torch.testing.assert_close(moe.last_stats.load.sum(), torch.tensor(1.0))


def test_training_and_expert_parallel_configurations_agree_with_token_drop_and_gradients():
    x = torch.randn(2, 9, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    up = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    results = []
    for pipeline in (TRAINING, MoEPipeline(token_groups=4)):
        moe = _moe(capacity_factor=0.75).train()
        moe.pipeline = pipeline
        xi = x.clone().requires_grad_()
        out, aux = moe(xi)
        ((out * up).sum() + aux).backward()
        results.append((out, aux, moe.last_stats, xi.grad,
                        [p.grad for p in moe.parameters()]))
    (o1, a1, s1, g1, p1), (o2, a2, s2, g2, p2) = results
    assert s1.dropped > 0 and s1.dropped == s2.dropped  # the case drops, and both drop the same
    torch.testing.assert_close(o2, o1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a2, a1)
    torch.testing.assert_close(g2, g1, rtol=1e-10, atol=1e-12)
    for a, b in zip(p2, p1):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_capacity_priority_is_first_choices_then_token_order():
    # 6 tokens, top-2 of 3 experts; expert 0 is everyone's first choice, capacity 4
    experts = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 2], [0, 1], [1, 0]])
    d = dispatch(experts, 3, capacity=4)
    kept = {(int(a) // 2, int(a) % 2) for a in d.order}  # (token, choice)
    assert {(t, 0) for t in range(4)} <= kept          # the first four first choices of 0 stay
    assert (4, 0) not in kept and (5, 1) not in kept   # the rest of expert 0 is dropped
    assert d.counts.tolist() == [4, 4, 2] and d.dropped == 2
    # the general path (token groups) keeps the same assignments
    p = plan(experts, 3, capacity=4, token_groups=3)
    assert sorted(p.order.tolist()) == sorted(d.order.tolist())
    assert p.counts.sum(0).tolist() == [4, 4, 2] and int(p.dropped()) == 2


def test_serving_configuration_is_sync_free():
    """On the meta device every host read of a tensor raises: the serving pipeline runs there
    (the decode step a CUDA graph captures), the training one does not (it reads counts)."""
    cfg = ModelConfig.from_preset("debug")
    with torch.device("meta"):
        moe = MoE(cfg).eval().to(torch.bfloat16)
        x = torch.randn(4, 1, cfg.hidden_size, dtype=torch.bfloat16)
    for pipeline in (SERVING, MoEPipeline(sync_free=True, matmul="grouped")):
        moe.pipeline = pipeline
        out, aux = moe(x)
        assert out.shape == x.shape and aux.shape == ()
    moe.pipeline = TRAINING
    with pytest.raises(NotImplementedError):
        moe(x)
    moe.train()  # a capacity needs the host: refused, not silently ignored
    moe.pipeline, moe.capacity_factor = MoEPipeline(sync_free=True), 1.0
    with pytest.raises(ValueError, match="sync-free"):
        moe(x)
    moe.capacity_factor = None  # training through the serving pipeline: no aux loss, refused
    moe.pipeline = SERVING
    with pytest.raises(ValueError, match="not for training"):
        moe(x.requires_grad_())


class _Int8Experts(nn.Module):
    """Weight-only int8 experts: int8 weights with one fp scale per output row, dequantised in
    the grouped matmul. Same call as `Experts`, so it drops into the pipeline's run stage."""

    def __init__(self, experts):
        super().__init__()
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(experts, name).detach()
            scale = w.abs().amax(-1, keepdim=True) / 127
            self.register_buffer(name + "_q", torch.round(w / scale).to(torch.int8))
            self.register_buffer(name + "_scale", scale)

    def dequantised(self, name):
        return getattr(self, name + "_q").to(torch.float64) * getattr(self, name + "_scale")

    def forward(self, x, counts, pipeline):
        from minimax01.ops.moe import grouped_mm

        gu, down = self.dequantised("gate_up_proj"), self.dequantised("down_proj")

        def compute(xe, ce):
            g, u = grouped_mm(xe, gu, ce).chunk(2, -1)
            return grouped_mm(F.silu(g) * u, down, ce)

        return pipeline.exchange.run(compute, x, counts)


def test_seam_a_quantised_experts_module_plugs_in():
    moe = _moe().eval()
    x = torch.randn(2, 5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    q = _Int8Experts(moe.experts)
    with torch.no_grad():
        moe.experts.gate_up_proj.copy_(q.dequantised("gate_up_proj"))
        moe.experts.down_proj.copy_(q.dequantised("down_proj"))
        want, _ = moe(x)
        moe.experts = q
        for pipeline in (TRAINING, MoEPipeline(token_groups=2)):
            moe.pipeline = pipeline
            got, _ = moe(x)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_seam_tensor_parallel_partial_sums_and_reduce():
    """Two 'TP ranks' each hold half of every expert's intermediate dim (w1 and w3 rows, down
    columns); each computes a partial output with the same pipeline, and `reduce` (here: adding
    the other rank's partial; an all-reduce across ranks) gives the full MoE output."""
    full = _moe().eval()
    x = torch.randn(2, 6, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want, _ = full(x)
    i = full.experts.down_proj.shape[-1]
    halves = []
    for r in range(2):
        part = _moe().eval()
        part.load_state_dict(full.state_dict(), strict=False)
        sl = slice(r * i // 2, (r + 1) * i // 2)
        gu = full.experts.gate_up_proj.detach().view(full.num_experts, 2, i, -1)[:, :, sl]
        part.experts.gate_up_proj = nn.Parameter(gu.reshape(full.num_experts, i, -1).clone())
        part.experts.down_proj = nn.Parameter(full.experts.down_proj.detach()[:, :, sl].clone())
        halves.append(part)
    with torch.no_grad():
        other, _ = halves[1](x)
        halves[0].pipeline = MoEPipeline(reduce=lambda out: out + other.reshape(out.shape))
        got, _ = halves[0](x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(other, want)  # a half alone is not the answer


def test_grouped_matmul_implementations_agree_including_empty_experts():
    from minimax01.ops.moe import MATMULS, grouped_mm

    g = torch.Generator().manual_seed(6)
    x = torch.randn(10, 16, generator=g)
    w = torch.randn(4, 8, 16, generator=g)
    counts = torch.tensor([3, 0, 7, 0])
    want = torch.cat([x[:3] @ w[0].t(), x[3:] @ w[2].t()])
    for impl in MATMULS:
        torch.testing.assert_close(grouped_mm(x, w, counts, impl), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown grouped matmul"):
        grouped_mm(x, w, counts, "fast")
    assert math.isclose(float(route(torch.zeros(1, 4), 2).weights.sum()), 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
@pytest.mark.parametrize("n,k", [(431, 64), (64, 431), (377, 385), (384, 64)])
def test_grouped_mm_any_width(n, k):
    """torch._grouped_mm needs 16-byte strides; widths that are not multiples of 8 (the ablation
    suite's parameter-matched experts, e.g. 431) are padded, not refused."""
    from minimax01.ops.moe import grouped_mm
    torch.manual_seed(0)
    counts = torch.tensor([5, 0, 17, 2], device="cuda")
    x = torch.randn(int(counts.sum()), k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4, n, k, device="cuda", dtype=torch.bfloat16)
    got = grouped_mm(x, w, counts, "grouped").float()
    ref = grouped_mm(x.float(), w.float(), counts, "loop")
    assert got.shape == ref.shape
    assert (got - ref).norm() / ref.norm() < 1e-2
