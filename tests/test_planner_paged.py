"""The paged memory plan (infer/planner.py plan_paged): the split of the budget between
lightning-state rows and K/V pages, sequences that fit by actual length, against the slot
planner, and the `info` table."""

import pytest

from minimax01 import ModelConfig
from minimax01.infer.planner import GiB, page_bytes, paged_fits_table, plan_memory, plan_paged


def test_split_of_the_budget_by_hand():
    cfg = ModelConfig.from_preset("1b")
    p = plan_paged(cfg, 80 * GiB, 131072, page_size=16, max_seqs=64)
    state = cfg.lightning_state_bytes()
    assert p.page_bytes == page_bytes(cfg, 16, 2) == 2 * 2 * 4 * 128 * 2 * 16  # 2 layers, K+V
    room = int(80 * GiB * 0.9) - p.activation_bytes
    assert p.num_seqs == 64 and p.num_pages == (room - 65 * state) // p.page_bytes
    assert p.pool_bytes <= room < p.pool_bytes + p.page_bytes
    assert p.token_capacity == (p.num_pages - 1) * 16
    assert p.pages_for(17) == 2


def test_actual_lengths_fit_where_max_context_slots_do_not():
    cfg = ModelConfig.from_preset("1b")
    budget = 24 * GiB
    slots = plan_memory(cfg, budget, 131072).num_slots   # every slot reserves 128K tokens
    p = plan_paged(cfg, budget, 131072)
    mixed = [131072, 2048, 500, 8192, 1] * 60             # mostly short, a few long
    n = p.sequences_that_fit(mixed)
    assert n > 2 * slots
    # by hand: pages are taken in order until one does not fit
    free, count = p.num_pages - 1, 0
    for length in mixed:
        need = -(-length // 16)
        if need > free or count == p.num_seqs:
            break
        free, count = free - need, count + 1
    assert n == count
    assert p.sequences_that_fit([131073]) == 0            # past max_context
    assert p.sequences_that_fit([1] * 1000) == p.num_seqs  # the state rows bound short ones


def test_does_not_fit_says_why():
    cfg = ModelConfig.from_preset("1b")
    with pytest.raises(ValueError, match="one sequence of 1,048,576 tokens does not fit"):
        plan_paged(cfg, 4 * GiB, 1 << 20)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        plan_paged(cfg, 80 * GiB, cfg.max_position_embeddings + 1)
    with pytest.raises(ValueError, match="must be positive"):
        plan_paged(cfg, 80 * GiB, 1024, page_size=0)
    # a model with no softmax layers has nothing to page: the state rows are the limit
    linear = ModelConfig.from_preset("debug", layer_types=["linear_attention"] * 4)
    p = plan_paged(linear, 8 * GiB, 4096, max_seqs=8)
    assert p.num_seqs == 8 and p.sequences_that_fit([4096] * 9) == 8


def test_info_table():
    cfg = ModelConfig.from_preset("1b")
    text = paged_fits_table(cfg, 80 * GiB, [8192, 131072])
    assert "Paged K/V (16-token pages, planned for contexts up to 131,072)" in text
    assert "holds 129 of any length" in text  # the slot pool at 131,072 (fits_table's number)
    assert "does not fit" in paged_fits_table(ModelConfig.from_preset("minimax-text-01"),
                                              80 * GiB, [8192])
