"""Paged attention (ops/paged_attention): the Triton kernel (interpreted on the CPU) against its
gather-then-SDPA twin and both against plain causal attention over contiguous K/V; pages written
by `write_kv` through the pool's slot mappings; odd lengths, length 1, page boundaries, many
sequences, shared prefix pages, GQA, key-range splits; bf16 on the GPU."""

import random

import pytest
import torch
import torch.nn.functional as F

from minimax01.infer.pool import PagePool
from minimax01.ops.paged_attention import (gather_pages, paged_attention, torch_paged_attention,
                                           triton_paged_attention, work_list, write_kv)

pytest.importorskip("triton")


def _contiguous(q, keys, values, ctx, qlen, scale):
    """Truth: per document, causal attention of queries at ctx..ctx+qlen-1 over its own keys."""
    out, start = [], 0
    h = q.shape[1]
    for kd, vd, c, n in zip(keys, values, ctx, qlen):
        qd = q[start:start + n].transpose(0, 1)  # [H, n, D]
        k = kd[:, :c + n].repeat_interleave(h // kd.shape[0], 0)
        v = vd[:, :c + n].repeat_interleave(h // kd.shape[0], 0)
        mask = torch.arange(c + n)[None, :] <= torch.arange(c, c + n)[:, None]
        out.append(F.scaled_dot_product_attention(qd, k, v, attn_mask=mask, scale=scale)
                   .transpose(0, 1))
        start += n
    return torch.cat(out)


def _setup(seed, ctx, qlen, page_size=4, hkv=2, h=4, d=16, dtype=torch.float32, shared=0):
    """Sequences with `ctx[n] + qlen[n]` tokens in interleaved pages of one pool (the first
    `shared` full pages common to all; then every ctx[n] >= shared * page_size), written through
    write_kv. Returns the kernel inputs and
    the contiguous keys/values per document."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    lengths = [c + n for c, n in zip(ctx, qlen)]
    pool = PagePool(num_pages=sum(lengths) // page_size + 2 * len(lengths) + shared + 4,
                    page_size=page_size)
    k_pages = torch.randn(pool.num_pages, hkv, page_size, d, generator=g).to(dtype)
    v_pages = torch.randn(pool.num_pages, hkv, page_size, d, generator=g).to(dtype)
    prefix_len = shared * page_size
    kp = torch.randn(hkv, prefix_len, d, generator=g).to(dtype)
    vp = torch.randn(hkv, prefix_len, d, generator=g).to(dtype)
    if shared:
        pool.allocate("prefix", prefix_len)
        write_kv(k_pages, v_pages, kp.transpose(0, 1), vp.transpose(0, 1),
                 pool.slot_mapping("prefix", 0, prefix_len))
    grown = [prefix_len if shared else 0] * len(lengths)
    for n in range(len(lengths)):
        pool.allocate(n, grown[n], prefix=pool.pages("prefix") if shared else ())
    while any(a < b for a, b in zip(grown, lengths)):  # grow in random steps: pages interleave
        n = rng.choice([i for i in range(len(lengths)) if grown[i] < lengths[i]])
        grown[n] = min(lengths[n], grown[n] + rng.randrange(1, 2 * page_size))
        pool.extend(n, grown[n])
    keys, values = [], []
    for n, length in enumerate(lengths):
        k = torch.randn(hkv, length, d, generator=g).to(dtype)
        v = torch.randn(hkv, length, d, generator=g).to(dtype)
        if shared:
            k[:, :prefix_len], v[:, :prefix_len] = kp, vp
        a = prefix_len if shared else 0
        write_kv(k_pages, v_pages, k[:, a:].transpose(0, 1), v[:, a:].transpose(0, 1),
                 pool.slot_mapping(n, a, length))
        keys.append(k)
        values.append(v)
    pool.check()
    table = pool.block_table(range(len(lengths)), width=max(map(pool.pages_needed, lengths)) + 1)
    q = torch.randn(sum(qlen), h, d, generator=g).to(dtype)
    i32 = dict(dtype=torch.int32)
    return (q, k_pages, v_pages, table, torch.tensor(ctx, **i32), torch.tensor(qlen, **i32),
            keys, values, pool)


@pytest.mark.parametrize("splits", [1, 3])
def test_prefill_chunks_and_decode_match_twin_and_contiguous(splits):
    # chunks continuing cached prefixes: odd lengths, page boundaries (ctx 8 with page 4), a
    # length-1 sequence, a chunk ending exactly on a page boundary
    ctx, qlen = [0, 8, 13, 0, 3], [9, 1, 7, 1, 5]
    q, kp, vp, table, c, n, keys, values, _ = _setup(0, ctx, qlen)
    truth = _contiguous(q, keys, values, ctx, qlen, 0.25)
    ref = torch_paged_attention(q, kp, vp, table, c, n, 0.25)
    torch.testing.assert_close(ref, truth, atol=1e-5, rtol=1e-5)
    out = triton_paged_attention(q, kp, vp, table, c, n, 0.25, num_splits=splits)
    torch.testing.assert_close(out, truth, atol=1e-5, rtol=1e-5)
    # decode: one query per sequence, program list given (the CUDA-graph form)
    ctx1, ones = [16, 3, 0, 31, 7], [1] * 5
    q1, kp, vp, table, c1, n1, keys, values, _ = _setup(1, ctx1, ones)
    work = (torch.arange(5, dtype=torch.int32), torch.zeros(5, dtype=torch.int32))
    truth = _contiguous(q1, keys, values, ctx1, ones, 0.25)
    out = triton_paged_attention(q1, kp, vp, table, c1, n1, 0.25, work=work, block_m=1,
                                 num_splits=splits)
    torch.testing.assert_close(out, truth, atol=1e-5, rtol=1e-5)


def test_many_sequences_gqa_and_shared_prefix_pages():
    rng = random.Random(2)
    ctx = [16 + rng.randrange(0, 30) for _ in range(12)]  # all behind a shared 16-token prefix
    qlen = [rng.choice([1, 1, 2, 5]) for _ in range(12)]
    q, kp, vp, table, c, n, keys, values, pool = _setup(2, ctx, qlen, page_size=8, hkv=1, h=8,
                                                        shared=2)
    assert all(table[i, :2].tolist() == pool.pages("prefix") for i in range(12))
    truth = _contiguous(q, keys, values, ctx, qlen, 0.3)
    for backend, kw in (("triton", dict(work=work_list(qlen, 2, q.device), block_m=2)),
                        ("triton", dict(num_splits=2)), ("torch", {}), (None, {})):
        out = paged_attention(q, kp, vp, table, c, n, 0.3, backend=backend, **kw)
        torch.testing.assert_close(out, truth, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown paged attention backend"):
        paged_attention(q, kp, vp, table, c, n, 0.3, backend="flash")


def test_only_own_visible_keys_matter():
    ctx, qlen = [5, 0], [3, 4]
    q, kp, vp, table, c, n, *_ = _setup(3, ctx, qlen)
    out = triton_paged_attention(q, kp, vp, table, c, n, 0.5)
    kp2, vp2 = kp.clone(), vp.clone()
    used = {p for row, length in zip(table.tolist(), (8, 4)) for p in row[:-(-length // 4)]}
    for p in range(kp.shape[0]):   # every page nobody's visible keys live in: garbage
        if p not in used:
            kp2[p] += 100.0
            vp2[p] -= 100.0
    torch.testing.assert_close(triton_paged_attention(q, kp2, vp2, table, c, n, 0.5), out)
    # and a visible key does matter
    kp2[table[1, 0], :, 0] += 5.0
    assert not torch.allclose(triton_paged_attention(q, kp2, vp2, table, c, n, 0.5), out)


def test_write_kv_and_gather_round_trip():
    g = torch.Generator().manual_seed(4)
    pool = PagePool(num_pages=6, page_size=3)
    pool.allocate("a", 2)
    pool.allocate("b", 4)
    pool.extend("a", 7)
    kp = torch.zeros(6, 2, 3, 5)
    vp = torch.zeros(6, 2, 3, 5)
    k = torch.randn(7, 2, 5, generator=g)
    write_kv(kp, vp, k, -k, pool.slot_mapping("a", 0, 7))
    got = gather_pages(kp, pool.block_table(["a"]), 7)[0]   # [Hkv, 7, D]
    torch.testing.assert_close(got.transpose(0, 1), k)
    torch.testing.assert_close(gather_pages(vp, pool.block_table(["a"]), 7)[0].transpose(0, 1), -k)
    assert kp[pool.pages("b")].abs().sum() == 0 and kp[0].abs().sum() == 0  # nothing else written
    with pytest.raises(ValueError, match="needs 3 pages"):
        gather_pages(kp, pool.block_table(["b"]), 7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("splits", [1, 8])
def test_cuda_paged_attention_bf16(splits):
    ctx, qlen = [0, 3000, 4095, 17], [700, 96, 1, 1]
    q, kp, vp, table, c, n, keys, values, _ = _setup(5, ctx, qlen, page_size=16, hkv=4, h=16,
                                                     d=128, dtype=torch.bfloat16)
    dev = "cuda"
    q, kp, vp, table, c, n = (x.to(dev) for x in (q, kp, vp, table, c, n))
    ref = torch_paged_attention(q, kp, vp, table, c, n, 128 ** -0.5)
    out = triton_paged_attention(q, kp, vp, table, c, n, 128 ** -0.5, num_splits=splits)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
