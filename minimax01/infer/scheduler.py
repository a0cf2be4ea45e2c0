"""Continuous batching under a token budget: which sequences get a cache slot, which prompt
chunks are prefilled and which sequences decode in the next engine step.

Policy (decode-first, token budget, like vLLM's `--max-num-batched-tokens` with chunked prefill):

  * every running sequence past its prompt decodes one token each step, always;
  * on top, at most `token_budget` prompt tokens are prefilled in one packed varlen pass. So a
    step's cost is bounded whatever arrives: a 1M-token prompt goes in budget-sized chunks across
    steps, and the running decodes' inter-token latency stays that of one decode plus one chunk.
    (Unlike vLLM, the decode tokens do not count against the budget: they always run.)
  * fairness is first-come first-served with no starvation: waiting requests get free slots in
    arrival order, and the budget goes to the prompts in the order they were admitted, so the
    oldest unfinished prompt is always the one progressing, and every prompt ahead of a
    request finishes in a bounded number of steps. A preempted request goes back to the front.
  * with a prefix cache (infer/prefix_cache.py) a newly admitted request starts from its longest
    cached prefix, and prefill chunks are cut at cache-block boundaries so the state at each
    chunk end can be snapshotted (a chunk that crosses a boundary stops at the last one it
    crosses; the budget it leaves goes to the next prompt).
  * preemption by recompute: when the pool cannot hold a running sequence's next tokens
    (`pool.reserve` fails: only a pool that sizes sequences by their actual length can run out),
    the most recently admitted sequence is preempted: its slot is freed and it goes back to the
    front of the waiting queue keeping its generated tokens; when re-admitted it prefills prompt +
    generated tokens again (from the prefix cache if they are there) and carries on decoding.
    Greedy output is unchanged by preemption (tests/test_scheduling.py)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from .detok import TextStream
from .request import SamplingParams, TokenLogprob
from .slot_cache import SlotPool

# Prompt tokens per step. Bounds the decode steps' latency while a long prompt is admitted, and
# the activation memory of one prefill pass; larger favours the long prompt's time to first
# token. Measured on one H200 (1b, 32 decoding + a 64K prompt admitted; BENCHMARKS.md "Serving"):
# budget 512 / 2048 / 8192 / 16384 / none -> p99 ITL 43 / 50 / 76 / 137 / 395 ms (decode-only
# 4.5 ms), TTFT 4.68 / 1.16 / 0.52 / 0.48 / 0.43 s. No budget meets both goals (p99 ITL <= 3x
# decode-only, TTFT <= 1.3x unbudgeted): a prefill step has a ~30 ms fixed cost. 8192 is the
# smallest budget within the TTFT goal (1.22x), at a fifth of the unbudgeted stall.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    max_tokens: int                       # resolved: never past the context limit
    generator: torch.Generator | None = None
    stream: TextStream | None = None
    arrival: float = field(default_factory=time.monotonic)
    slot: int | None = None
    num_cached: int = 0                   # tokens the slot holds
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    images: object | None = None          # infer/vision_inputs.ImageInputs (VL models)
    prefill_target: int = -1              # tokens to prefill before decoding (prompt, or
                                          # prompt + generated tokens after a preemption)
    cached_tokens: int | None = None      # prompt tokens the prefix cache served (first admission)
    preemptions: int = 0

    def __post_init__(self):
        if self.prefill_target < 0:
            self.prefill_target = len(self.prompt_ids)

    @property
    def prefilling(self) -> bool:
        return self.num_cached < self.prefill_target

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def tokens(self, start: int = 0, stop: int | None = None) -> list[int]:
        """Tokens [start, stop) of prompt + generated output."""
        n = len(self.prompt_ids)
        stop = n + len(self.output_ids) if stop is None else stop
        if stop <= n:
            return self.prompt_ids[start:stop]
        return self.prompt_ids[start:] + self.output_ids[max(start - n, 0):stop - n]


@dataclass
class StepPlan:
    prefill: list[tuple[Sequence, int, int]]  # (sequence, first token, number of tokens)
    decode: list[Sequence]
    admitted: list[Sequence] = field(default_factory=list)


class Scheduler:
    """`token_budget`: prompt tokens per step. `prefix_cache`: a PrefixCache or None.
    `prefill_chunk` is the old name of the budget (still accepted)."""

    def __init__(self, pool: SlotPool, token_budget: int, max_batch: int | None = None,
                 prefix_cache=None):
        if token_budget <= 0:
            raise ValueError(f"max_num_batched_tokens must be positive, got {token_budget}")
        self.pool = pool
        self.token_budget = token_budget
        self.max_batch = min(max_batch or pool.num_slots, pool.num_slots)
        self.prefix_cache = prefix_cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def prefill_chunk(self) -> int:  # the budget's old name
        return self.token_budget

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Mark a request finished ("abort"); its slot is freed at the next `schedule`."""
        for seq in list(self.waiting) + self.running:
            if seq.request_id == request_id and not seq.finished:
                seq.finish_reason = "abort"
                return seq
        return None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def reap(self) -> list[Sequence]:
        """Free the slots of finished sequences; returns the aborted ones (running or waiting),
        which have not reported their end yet."""
        aborted = []
        for seq in [s for s in self.running if s.finished]:
            self.pool.release(seq.slot)
            seq.slot = None
            self.running.remove(seq)
            if seq.finish_reason == "abort":
                aborted.append(seq)
        aborted += [s for s in self.waiting if s.finished]
        self.waiting = deque(s for s in self.waiting if not s.finished)
        return aborted

    # ------------------------------------------------------------------ one step's plan
    def schedule(self) -> StepPlan:
        self.reap()
        admitted = self._admit()
        while True:
            decode = self._reserve_decodes()
            prefill, budget = [], self.token_budget
            for seq in self.running:
                if budget == 0:
                    break
                if seq.prefilling:
                    n = self._chunk(seq, budget)
                    if n:
                        prefill.append((seq, seq.num_cached, n))
                        budget -= n
            if prefill or decode or len(self.running) <= 1:
                break
            self.preempt(self.running[-1])  # prompts only, none can grow: make room
        return StepPlan(prefill, decode, [s for s in admitted if s.slot is not None])

    def _admit(self) -> list[Sequence]:
        """Waiting requests get free slots in arrival order (a preempted one is at the front),
        starting from their longest cached prefix."""
        admitted = []
        while self.waiting and len(self.running) < self.max_batch and self.pool.free_slots:
            seq = self.waiting.popleft()
            seq.slot = self.pool.allocate()
            seq.num_cached = 0
            if self.prefix_cache is not None and seq.images is None:  # images: same token ids
                hit = self.prefix_cache.load(seq.tokens(0, seq.prefill_target), seq.slot)
                if hit and not self.pool.reserve(seq.slot, hit):
                    hit = 0  # (the pool cannot take it: prefill from the start)
                    self.prefix_cache.cancel_load(seq.slot)
                seq.num_cached = hit
            if seq.cached_tokens is None:
                seq.cached_tokens = seq.num_cached
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def _reserve_decodes(self) -> list[Sequence]:
        """Room for one more token of every decoding sequence; preempts the newest sequences
        while the pool cannot give it."""
        decode = []
        for seq in list(self.running):
            if seq.slot is None or seq.prefilling:
                continue
            while not self.pool.reserve(seq.slot, seq.num_cached + 1):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.slot is not None:
                decode.append(seq)
        return decode

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """The prompt tokens `seq` prefills this step: within the budget, cut at the last cache
        block boundary it crosses, and no more than the pool can hold."""
        start, target = seq.num_cached, seq.prefill_target
        end = min(target, start + budget)
        if self.prefix_cache is not None:
            bs = self.prefix_cache.block_size
            last = (end - 1) // bs * bs if end == target else end // bs * bs
            if last > start:
                end = last
        while end > start and not self.pool.reserve(seq.slot, end):
            end = start + (end - start) // 2  # a smaller chunk may still fit
        return end - start

    def preempt(self, seq: Sequence) -> None:
        """Recompute preemption: free the slot, requeue at the front keeping the generated
        tokens; on re-admission prompt + output are prefilled again."""
        self.pool.release(seq.slot)
        if self.prefix_cache is not None:
            self.prefix_cache.cancel_load(seq.slot)
        seq.slot = None
        self.running.remove(seq)
        seq.num_cached = 0
        seq.prefill_target = len(seq.prompt_ids) + len(seq.output_ids)
        seq.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
