"""Token-budget scheduling (infer/scheduler.py): every step carries all decodes plus at most the
budget of prompt tokens; prompts progress first-come first-served; recompute preemption when the
pool runs out leaves greedy outputs unchanged."""

import pytest
import torch

from test_prefix_cache import GREEDY, outputs, tiny_config, workload
from minimax01 import MiniMaxForCausalLM
from minimax01.infer.engine import Engine
from minimax01.infer.slot_cache import SlotPool


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MiniMaxForCausalLM(tiny_config()).eval()


def plans(engine):
    """Run to the end, recording each step's (decode rows, prefill chunks)."""
    seen, inner = [], engine.scheduler.schedule

    def schedule():
        plan = inner()
        seen.append(([s.request_id for s in plan.decode],
                     [(s.request_id, start, n) for s, start, n in plan.prefill]))
        return plan

    engine.scheduler.schedule = schedule
    return seen


@pytest.mark.parametrize("prefix", [False, True])
def test_budget_bounds_every_step_and_decodes_always_run(model, prefix):
    g = torch.Generator().manual_seed(3)
    long = torch.randint(0, 256, (90,), generator=g).tolist()
    short = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 5)]
    ref = outputs(Engine(model, num_slots=3, max_context=256, max_num_batched_tokens=512,
                         prefix_cache=False), short + [long])
    eng = Engine(model, num_slots=3, max_context=256, max_num_batched_tokens=10,
                 prefix_cache=prefix, prefix_block_size=8)
    seen = plans(eng)
    params = GREEDY.__class__(max_tokens=12, temperature=0.0, ignore_eos=True)
    ids = [eng.add_request(p, params) for p in short]
    got = {}
    for _ in range(3):  # the short ones start decoding, then the long prompt arrives
        for o in eng.step():
            got.setdefault(o.request_id, []).extend(o.token_ids)
    ids.append(eng.add_request(long, GREEDY))
    while eng.has_work():
        for o in eng.step():
            got.setdefault(o.request_id, []).extend(o.token_ids)
    assert [got[i][:4] for i in ids] == ref
    assert all(sum(n for _, _, n in pre) <= 10 for _, pre in seen)
    long_steps = [(dec, pre) for dec, pre in seen if any(r == ids[2] for r, _, _ in pre)]
    assert len(long_steps) >= 9  # 90 tokens in chunks of at most 10
    # while the long prompt was being prefilled, the short requests decoded in every step
    running = [dec for dec, _ in long_steps if dec]
    assert running and all(set(ids[:2]) <= set(dec) for dec in running[:5])
    if prefix:  # chunks end on 8-token block boundaries (snapshot points) but for the last
        ends = [s + n for dec, pre in long_steps for r, s, n in pre if r == ids[2]]
        assert all(e % 8 == 0 for e in ends[:-1]) and ends[-1] == 90


def test_prompts_progress_first_come_first_served(model):
    prompts = [torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(3)]
    eng = Engine(model, num_slots=3, max_context=256, max_num_batched_tokens=16,
                 prefix_cache=False)
    seen = plans(eng)
    ids = [eng.add_request(p, GREEDY) for p in prompts]
    while eng.has_work():
        eng.step()
    order = [r for _, pre in seen for r, _, _ in pre]
    first_full = {}
    for step, (_, pre) in enumerate(seen):
        for r, s, n in pre:
            if s + n == 40:
                first_full[r] = step
    assert first_full[ids[0]] < first_full[ids[1]] < first_full[ids[2]]
    assert order[0] == ids[0]


class TokenPool(SlotPool):
    """A slot pool that can hold only `capacity` tokens in all (as a paged pool would): reserve
    fails once the running sequences' lengths would pass it."""

    def __init__(self, *a, capacity, **k):
        super().__init__(*a, **k)
        self.capacity, self.held = capacity, {}

    def reserve(self, slot, num_tokens):
        others = sum(n for s, n in self.held.items() if s != slot)
        if others + num_tokens > self.capacity or num_tokens > self.max_context:
            return False
        self.held[slot] = max(self.held.get(slot, 0), num_tokens)
        return True

    def release(self, slot):
        super().release(slot)
        self.held.pop(slot, None)


@pytest.mark.parametrize("prefix", [False, True])
def test_preemption_by_recompute_keeps_greedy_outputs(model, prefix):
    prompts = workload(7, n=6)
    params = GREEDY.__class__(max_tokens=10, temperature=0.0, ignore_eos=True)
    want = outputs(Engine(model, num_slots=4, max_context=256, max_num_batched_tokens=24,
                          prefix_cache=False), prompts, params)
    eng = Engine(model, num_slots=4, max_context=256, max_num_batched_tokens=24,
                 prefix_cache=prefix, prefix_block_size=8)
    pool = TokenPool(eng.config, 4, 256, capacity=max(map(len, prompts)) + 40)
    eng.pool = eng.cache.pool = eng.scheduler.pool = pool
    if prefix:
        eng.prefix_store.pool = pool
    assert outputs(eng, prompts, params) == want
    assert eng.scheduler.num_preemptions > 0
    assert pool.free_slots == 4 and not pool.held


@pytest.mark.parametrize("argv, fragment", [
    (["--max-num-batched-tokens", "0"], "--max-num-batched-tokens must be positive"),
    (["--prefill-chunk", "-3"], "--max-num-batched-tokens must be positive"),
    (["--prefix-block-size", "0"], "--prefix-block-size must be positive"),
    (["--kv-page-size", "0"], "--kv-page-size must be positive"),
    (["--prefix-cache-gb", "nan"], "--prefix-cache-gb must be a number of GiB >= 0"),
    (["--prefix-cache-gb", "-1"], "--prefix-cache-gb must be a number of GiB >= 0"),
])
def test_serve_scheduling_flags_fail_in_one_line(capsys, argv, fragment):
    from minimax01.cli import main

    assert main(["serve", "--preset", "debug", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err and "Traceback" not in err
