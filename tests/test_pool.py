"""The paged K/V allocator (infer/pool.py): allocation, extension, truncation, freeing, shared
prefix pages with refcounts, block tables and slot mappings, out-of-pages errors that change
nothing, and a random workload against a plain model of who holds what."""

import random

import pytest
import torch

from minimax01.infer.pool import NULL_PAGE, OutOfPages, PagePool, kv_page_shape, pages_for


def test_allocate_extend_free_and_capacity():
    pool = PagePool(num_pages=9, page_size=4)
    assert pool.capacity == 8 and pool.free_pages == 8
    assert [pages_for(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    assert pool.allocate("a", 5) == [1, 2]          # low pages first, never the null page
    assert pool.extend("a", 8) == [] and pool.extend("a", 9) == [3]
    assert pool.length("a") == 9 and pool.pages("a") == [1, 2, 3]
    assert pool.allocate("b", 0) == [] and pool.extra_pages("b", 1) == 1
    assert pool.extra_pages("new", 17) == 5 and pool.can_fit("new", 20) and not pool.can_fit("new", 21)
    pool.check()
    pool.free("a")
    assert pool.free_pages == 8 and "a" not in pool
    pool.check()
    with pytest.raises(KeyError, match="'a' is not allocated"):
        pool.free("a")
    with pytest.raises(ValueError, match="already allocated"):
        pool.allocate("b", 3)
    with pytest.raises(ValueError, match="num_pages"):
        PagePool(1, 4)
    assert kv_page_shape(9, 2, 4, 16) == (9, 2, 4, 16)


def test_out_of_pages_is_clear_and_changes_nothing():
    pool = PagePool(num_pages=4, page_size=2)  # 3 usable
    pool.allocate("a", 3)                      # 2 pages
    with pytest.raises(OutOfPages, match="need 2, 1 free") as err:
        pool.allocate("b", 4)
    assert err.value.needed == 2 and err.value.free == 1 and "b" not in pool
    with pytest.raises(OutOfPages):
        pool.extend("a", 7)
    assert pool.length("a") == 3 and pool.pages("a") == [1, 2] and pool.free_pages == 1
    pool.check()


def test_shared_prefix_pages_refcount_and_read_only():
    pool = PagePool(num_pages=8, page_size=4)
    pool.allocate("a", 10)                      # pages 1, 2 full; 3 partial
    shared = pool.pages("a")[:2]
    pool.retain(shared)                         # a prefix cache keeps them
    pool.allocate("b", 9, prefix=shared)        # b = shared prefix + its own page
    assert pool.pages("b")[:2] == shared and pool.refcount[shared[0]] == 3
    with pytest.raises(ValueError, match="shared pages must be full"):
        pool.allocate("c", 7, prefix=shared)
    with pytest.raises(ValueError, match="shared page"):
        pool.slot_mapping("b", 6, 9)             # position 6 is in a shared page
    assert pool.slot_mapping("b", 8, 9).tolist() == [pool.pages("b")[2] * 4]
    pool.free("a")
    pool.free("b")
    assert pool.refcount[shared[0]] == 1 and pool.free_pages == 5  # only the cache holds them
    pool.check()
    with pytest.raises(ValueError, match="not retained"):
        pool.release([6])
    pool.release(shared)
    assert pool.free_pages == 7
    pool.check()
    with pytest.raises(ValueError, match="not allocated"):
        pool.retain([shared[0]])


def test_block_table_and_slot_mapping():
    pool = PagePool(num_pages=10, page_size=4)
    pool.allocate("x", 6)
    pool.allocate("y", 1)
    pool.extend("x", 9)  # x: pages 1, 2, 4 (y took 3)
    table = pool.block_table(["x", None, "y"], width=4)
    assert table.dtype == torch.int32
    assert table.tolist() == [[1, 2, 4, NULL_PAGE], [0, 0, 0, 0], [3, 0, 0, 0]]
    assert pool.slot_mapping("x", 3, 9).tolist() == [7, 8, 9, 10, 11, 16]
    with pytest.raises(ValueError, match="width 2 < 3"):
        pool.block_table(["x"], width=2)
    with pytest.raises(ValueError, match="outside"):
        pool.slot_mapping("x", 8, 10)
    pool.truncate("x", 4)
    assert pool.pages("x") == [1] and pool.free_pages == 7
    pool.check()


def test_random_workload_matches_a_simple_model():
    rng = random.Random(0)
    ps, n = 3, 20
    pool = PagePool(num_pages=n, page_size=ps)
    model_len: dict[int, int] = {}
    held: list[list[int]] = []   # what the "prefix cache" retains
    for step in range(600):
        op = rng.random()
        seq = rng.randrange(12)
        try:
            if seq not in model_len and op < 0.5:
                length = rng.randrange(0, 12)
                prefix = held[rng.randrange(len(held))] if held and rng.random() < 0.4 else []
                length = max(length, len(prefix) * ps)
                pool.allocate(seq, length, prefix=prefix)
                model_len[seq] = length
                assert pool.pages(seq)[:len(prefix)] == prefix
            elif seq in model_len and op < 0.6:
                new = model_len[seq] + rng.randrange(0, 7)
                pool.extend(seq, new)
                model_len[seq] = new
            elif seq in model_len and op < 0.7:
                new = rng.randrange(0, model_len[seq] + 1)
                pool.truncate(seq, new)
                model_len[seq] = new
            elif seq in model_len and op < 0.8:
                full = pool.pages(seq)[:model_len[seq] // ps]
                if full:
                    pool.retain(full)
                    held.append(full)
            elif held and op < 0.85:
                pool.release(held.pop(rng.randrange(len(held))))
            elif seq in model_len:
                pool.free(seq)
                del model_len[seq]
        except OutOfPages as e:
            assert e.needed > pool.free_pages
        pool.check()
        # free pages = usable pages no sequence and no retain holds
        used = {p for s in model_len for p in pool.pages(s)} | {p for h in held for p in h}
        assert pool.free_pages == n - 1 - len(used)
        for s, length in model_len.items():
            assert pool.length(s) == length and len(pool.pages(s)) == pages_for(length, ps)
    for s in list(model_len):
        pool.free(s)
    for h in held:
        pool.release(h)
    assert pool.free_pages == n - 1  # no leaks, no fragmentation: every page comes back
    pool.check()
