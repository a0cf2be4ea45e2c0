"""The slot-attention op (ops/slot_attention): the Triton kernel (interpreted on the CPU) against
its plain-PyTorch twin, prefill and decode forms, GQA, key-range splits, empty documents; the
dispatcher; and the serving cache's per-step records."""

import pytest
import torch

from minimax01 import ModelConfig
from minimax01.infer.slot_cache import DecodeStep, PrefillStep, SlotCache, SlotPool
from minimax01.ops.slot_attention import (decode_splits, slot_attention, torch_slot_attention,
                                          triton_slot_attention, work_list)

pytest.importorskip("triton")


def _pool(g, s=4, hkv=2, length=48, d=16, dtype=torch.float32):
    return (torch.randn(s, hkv, length, d, generator=g, dtype=dtype),
            torch.randn(s, hkv, length, d, generator=g, dtype=dtype))


@pytest.mark.parametrize("splits", [1, 3])
def test_triton_slot_attention_matches_reference(splits):
    g = torch.Generator().manual_seed(0)
    h, d = 4, 16
    keys, values = _pool(g)
    # prefill: three documents, two continuing from a cached prefix
    slot = torch.tensor([3, 0, 2], dtype=torch.int32)
    ctx = torch.tensor([0, 17, 30], dtype=torch.int32)
    qlen = torch.tensor([9, 1, 18], dtype=torch.int32)
    q = torch.randn(int(qlen.sum()), h, d, generator=g)
    ref = torch_slot_attention(q, keys, values, slot, ctx, qlen, 0.25)
    out = triton_slot_attention(q, keys, values, slot, ctx, qlen, 0.25, num_splits=splits)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # decode: one query per slot, program list given (the CUDA-graph form)
    ones = torch.ones(3, dtype=torch.int32)
    q1 = torch.randn(3, h, d, generator=g)
    ctx1 = torch.tensor([5, 47, 0], dtype=torch.int32)
    work = (torch.arange(3, dtype=torch.int32), torch.zeros(3, dtype=torch.int32))
    ref = torch_slot_attention(q1, keys, values, slot, ctx1, ones, 0.25)
    out = triton_slot_attention(q1, keys, values, slot, ctx1, ones, 0.25, work=work, block_m=1,
                                num_splits=splits)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_gqa_groups_empty_documents_and_the_dispatcher():
    g = torch.Generator().manual_seed(1)
    keys, values = _pool(g, s=3, hkv=1, length=40)
    h = 8  # 8 query heads share the one KV head
    slot = torch.tensor([1, 2, 0], dtype=torch.int32)
    ctx = torch.tensor([3, 0, 20], dtype=torch.int32)
    qlen = torch.tensor([5, 0, 11], dtype=torch.int32)  # an empty document in the middle
    q = torch.randn(16, h, 16, generator=g)
    ref = torch_slot_attention(q, keys, values, slot, ctx, qlen, 0.3)
    work = work_list(qlen.tolist(), 2, q.device)
    assert work[0].tolist() == [0, 0, 0, 2, 2, 2, 2, 2, 2] and work[1].tolist()[:3] == [0, 2, 4]
    for backend, kw in (("triton", dict(work=work, block_m=2)), ("torch", {}), (None, {})):
        out = slot_attention(q, keys, values, slot, ctx, qlen, 0.3, backend=backend, **kw)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # a query sees its own slot's keys 0..p only: changing a later key changes nothing
    keys2 = keys.clone()
    keys2[1, :, 3 + 5:] += 100.0
    torch.testing.assert_close(torch_slot_attention(q, keys2, values, slot, ctx, qlen, 0.3)[:5],
                               ref[:5])
    with pytest.raises(ValueError, match="unknown slot attention backend"):
        slot_attention(q, keys, values, slot, ctx, qlen, 0.3, backend="flash")


def test_decode_splits_fill_the_gpu_and_stay_fixed_per_batch():
    assert decode_splits(1, 4, 1 << 20) == 64           # few programs: split the keys wide
    assert decode_splits(256, 4, 1 << 20) == 1          # already two waves of programs
    assert decode_splits(1, 4, 300) == 2                # no split shorter than 256 keys


def test_step_records_hold_their_own_mode():
    cfg = ModelConfig.from_preset("debug")
    cache = SlotCache(SlotPool(cfg, num_slots=2, max_context=32))
    pre = cache.begin_prefill([1, 0], [0, 3], [4, 2])
    assert isinstance(pre, PrefillStep) and not hasattr(pre, "slot_idx")
    assert pre.cu_seqlens.tolist() == [0, 4, 6] and pre.token_pos.tolist() == [0, 1, 2, 3, 3, 4]
    assert pre.token_slot.tolist() == [1, 1, 1, 1, 0, 0]
    dec = cache.begin_decode(torch.tensor([0, 2]), torch.tensor([True, False]), [5, 0])
    assert isinstance(dec, DecodeStep) and not hasattr(dec, "cu_seqlens")
    with pytest.raises(ValueError, match="decode expects \\[2, 1\\]"):
        dec.prepare(torch.ones(1, 6, dtype=torch.bool), None)
    with pytest.raises(ValueError, match="packed"):
        pre.prepare(torch.ones(2, 1, dtype=torch.bool), None)
    cache.pool.lengths[0] = 5
    assert dec.prepare(torch.ones(2, 1, dtype=torch.bool)).tolist() == [[5], [0]]  # pad row: 0
    with pytest.raises(ValueError, match="max_context=32"):
        cache.begin_prefill([0], [30], [3])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("splits", [1, 8])
def test_cuda_slot_attention_bf16(splits):
    g = torch.Generator(device="cuda").manual_seed(0)
    s, hkv, length, d, h = 3, 4, 4096, 128, 16
    kw = dict(device="cuda", dtype=torch.bfloat16, generator=g)
    keys, values = torch.randn(s, hkv, length, d, **kw), torch.randn(s, hkv, length, d, **kw)
    slot = torch.tensor([2, 0], dtype=torch.int32, device="cuda")
    ctx = torch.tensor([0, 3000], dtype=torch.int32, device="cuda")
    qlen = torch.tensor([700, 96], dtype=torch.int32, device="cuda")
    q = torch.randn(796, h, d, **kw)
    ref = torch_slot_attention(q, keys, values, slot, ctx, qlen, d ** -0.5)
    out = triton_slot_attention(q, keys, values, slot, ctx, qlen, d ** -0.5, num_splits=splits)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
