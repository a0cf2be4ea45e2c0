"""The three reference forms of lightning attention agree (SPEC §3, §8)."""

import pytest
import torch

from minimax01.ops import lightning_attn, lightning_decode
from minimax01.ops.lightning import alibi_slopes, lightning_slopes

F64 = torch.float64


def rand_inputs(b, t, h, d, e=None, seed=0, dtype=F64, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    e = e or d
    q = torch.randn(b, t, h, d, generator=g, dtype=dtype) * 0.5
    k = torch.randn(b, t, h, d, generator=g, dtype=dtype) * 0.5
    v = torch.randn(b, t, h, e, generator=g, dtype=dtype)
    # a spread of decays, from fast (exp(-2)) to nearly none (exp(-1e-3))
    slope = torch.logspace(-3, 0.3, h, dtype=torch.float32)
    return [x.requires_grad_(requires_grad) for x in (q, k, v)] + [slope]


def test_alibi_slopes_known_values():
    s = alibi_slopes(64)
    assert s[0] == pytest.approx(2 ** (-1 / 8)) and s[0] == pytest.approx(0.917, abs=1e-3)
    assert s[63] == pytest.approx(1 / 256)
    assert alibi_slopes(6) == pytest.approx([0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125])
    assert alibi_slopes(8) == pytest.approx([2 ** -(i + 1) for i in range(8)])


def test_layer_factor():
    s = lightning_slopes(8, 0, 80)
    assert s.dtype == torch.float32
    assert s[0].item() == pytest.approx(0.5 * (1 + 1e-5))
    last = lightning_slopes(8, 79, 80)
    assert last[0].item() == pytest.approx(0.5 * 1e-5, rel=1e-5)
    assert lightning_slopes(4, 0, 1)[0].item() == pytest.approx(2 ** -2 * (1 + 1e-5))


@pytest.mark.parametrize("t,block", [(1, 4), (7, 4), (16, 4), (33, 8), (50, 64), (64, 16)])
@pytest.mark.parametrize("with_state", [False, True])
def test_forms_agree(t, block, with_state):
    q, k, v, slope = rand_inputs(2, t, 3, 8, 6, seed=t)
    s0 = torch.randn(2, 3, 8, 6, dtype=F64) if with_state else None
    ref_o, ref_s = lightning_attn(q, k, v, slope, initial_state=s0, output_final_state=True,
                                  backend="recurrent")
    for backend, bs in (("naive", None), ("chunk", block), ("chunk", None)):
        o, s = lightning_attn(q, k, v, slope, initial_state=s0, output_final_state=True,
                              backend=backend, block_size=bs)
        torch.testing.assert_close(o, ref_o, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s, ref_s, rtol=1e-10, atol=1e-10)


def test_definition_by_hand():
    # two tokens, one head, d = 1: S1 = k1 v1, o1 = q1 k1 v1; S2 = l S1 + k2 v2, o2 = q2 S2
    q = torch.tensor([2.0, 3.0], dtype=F64).view(1, 2, 1, 1)
    k = torch.tensor([5.0, 7.0], dtype=F64).view(1, 2, 1, 1)
    v = torch.tensor([11.0, 13.0], dtype=F64).view(1, 2, 1, 1)
    slope = torch.tensor([0.5])
    lam = torch.exp(torch.tensor(-0.5, dtype=F64)).item()
    for backend in ("naive", "recurrent", "chunk"):
        o, s = lightning_attn(q, k, v, slope, output_final_state=True, backend=backend, block_size=1)
        s1 = 5 * 11
        s2 = lam * s1 + 7 * 13
        assert o.flatten().tolist() == pytest.approx([2 * s1, 3 * s2])
        assert s.item() == pytest.approx(s2)


@pytest.mark.parametrize("backend,block", [("naive", None), ("chunk", 4), ("chunk", 5)])
def test_gradients_agree(backend, block):
    q, k, v, slope = rand_inputs(1, 13, 2, 4, 3, seed=1, requires_grad=True)
    s0 = torch.randn(1, 2, 4, 3, dtype=F64, requires_grad=True)
    w_o = torch.randn(1, 13, 2, 3, dtype=F64)
    w_s = torch.randn(1, 2, 4, 3, dtype=F64)

    def grads(bk, bs):
        o, s = lightning_attn(q, k, v, slope, initial_state=s0, output_final_state=True,
                              backend=bk, block_size=bs)
        loss = (o * w_o).sum() + (s * w_s).sum()
        return torch.autograd.grad(loss, (q, k, v, s0))

    ref = grads("recurrent", None)
    got = grads(backend, block)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_recurrent_gradcheck():
    q, k, v, slope = rand_inputs(1, 5, 2, 3, 2, seed=2, requires_grad=True)
    s0 = torch.randn(1, 2, 3, 2, dtype=F64, requires_grad=True)

    def f(q, k, v, s0):
        return lightning_attn(q, k, v, slope, initial_state=s0, output_final_state=True,
                              backend="chunk", block_size=2)

    assert torch.autograd.gradcheck(f, (q, k, v, s0))


@pytest.mark.parametrize("backend", ["naive", "recurrent", "chunk"])
def test_varlen_equals_separate(backend):
    lens = [5, 1, 17, 9, 0, 32]
    total = sum(lens)
    q, k, v, slope = rand_inputs(1, total, 2, 4, seed=3)
    s0 = torch.randn(len(lens), 2, 4, 4, dtype=F64)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    o, s = lightning_attn(q, k, v, slope, initial_state=s0, output_final_state=True, cu_seqlens=cu,
                          backend=backend, block_size=8)
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o1, s1 = lightning_attn(q[:, a:b], k[:, a:b], v[:, a:b], slope, initial_state=s0[n:n + 1],
                                output_final_state=True, backend="recurrent")
        torch.testing.assert_close(o[:, a:b], o1, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s[n:n + 1], s1, rtol=1e-10, atol=1e-10)


def test_state_chaining_equals_whole():
    q, k, v, slope = rand_inputs(2, 40, 2, 4, seed=4)
    o, s = lightning_attn(q, k, v, slope, output_final_state=True, backend="chunk", block_size=8)
    o1, s1 = lightning_attn(q[:, :23], k[:, :23], v[:, :23], slope, output_final_state=True,
                            backend="chunk", block_size=8)
    o2, s2 = lightning_attn(q[:, 23:], k[:, 23:], v[:, 23:], slope, initial_state=s1,
                            output_final_state=True, backend="chunk", block_size=8)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o)
    torch.testing.assert_close(s2, s)


@pytest.mark.parametrize("slots", [False, True])
def test_decode_matches_recurrence(slots):
    q, k, v, slope = rand_inputs(3, 6, 2, 4, 5, seed=5)
    _, s_ref = lightning_attn(q, k, v, slope, output_final_state=True, backend="recurrent")
    o_ref, _ = lightning_attn(q, k, v, slope, backend="recurrent")
    if slots:
        pool = torch.full((7, 2, 4, 5), float("nan"), dtype=F64)
        idx = torch.tensor([4, 0, 6])
        pool[idx] = 0
    else:
        pool = torch.zeros(3, 2, 4, 5, dtype=F64)
        idx = None
    for t in range(6):
        o = lightning_decode(q[:, t], k[:, t], v[:, t], pool, slope, slot_idx=idx, backend="chunk")
        torch.testing.assert_close(o, o_ref[:, t])
    got = pool[idx] if slots else pool
    torch.testing.assert_close(got, s_ref)
    if slots:
        assert torch.isnan(pool[[1, 2, 3, 5]]).all()  # untouched slots


def test_bf16_inputs_fp32_state():
    q, k, v, slope = rand_inputs(1, 20, 2, 8, seed=6, dtype=torch.float32)
    o32, s32 = lightning_attn(q, k, v, slope, output_final_state=True, backend="chunk")
    o16, s16 = lightning_attn(q.bfloat16(), k.bfloat16(), v.bfloat16(), slope,
                              output_final_state=True, backend="chunk")
    assert o16.dtype == torch.bfloat16 and s16.dtype == torch.float32
    assert ((o16.float() - o32).norm() / o32.norm()).item() < 2e-2


@pytest.mark.parametrize("kwargs,match", [
    (dict(q_shape=(2, 5, 3)), "must be"),
    (dict(slope_shape=(4,)), "slope"),
    (dict(cu=[0, 3, 4]), "cu_seqlens"),
    (dict(cu=[1, 5]), "cu_seqlens"),
    (dict(state_shape=(3, 2, 4, 4)), "initial_state"),
    (dict(backend="cuda-magic"), "unknown lightning backend"),
    (dict(block_size=0), "block_size"),
])
def test_bad_inputs(kwargs, match):
    q, k, v, slope = rand_inputs(1, 5, 2, 4)
    if "q_shape" in kwargs:
        q = torch.zeros(kwargs["q_shape"], dtype=F64)
    if "slope_shape" in kwargs:
        slope = torch.ones(kwargs["slope_shape"])
    cu = torch.tensor(kwargs["cu"]) if "cu" in kwargs else None
    s0 = torch.zeros(kwargs["state_shape"], dtype=F64) if "state_shape" in kwargs else None
    with pytest.raises(ValueError, match=match):
        lightning_attn(q, k, v, slope, initial_state=s0, cu_seqlens=cu,
                       backend=kwargs.get("backend", "chunk"), block_size=kwargs.get("block_size"))
