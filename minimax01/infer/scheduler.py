"""Continuous batching: which sequences get a cache slot, which prompt chunks are prefilled and
which sequences decode in the next engine step.

Policy (chunked prefill, decode-first): every sequence that has finished its prompt decodes one
token each step; on top, up to `prefill_chunk` prompt tokens are prefilled in one packed varlen
pass, taken first-come first-served, a long prompt in several chunks. So a 1M-token prompt never
stalls the running decodes, and never needs more activation memory than one chunk."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from .detok import TextStream
from .request import SamplingParams, TokenLogprob
from .slot_cache import SlotPool


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

    @property
    def prefilling(self) -> bool:
        return self.num_cached < len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StepPlan:
    prefill: list[tuple[Sequence, int, int]]  # (sequence, first prompt token, number of tokens)
    decode: list[Sequence]


class Scheduler:
    def __init__(self, pool: SlotPool, prefill_chunk: int, max_batch: int | None = None):
        if prefill_chunk <= 0:
            raise ValueError(f"prefill_chunk must be positive, got {prefill_chunk}")
        self.pool = pool
        self.prefill_chunk = prefill_chunk
        self.max_batch = min(max_batch or pool.num_slots, pool.num_slots)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

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

    def schedule(self) -> StepPlan:
        self.reap()
        while self.waiting and len(self.running) < self.max_batch and self.pool.free_slots:
            seq = self.waiting.popleft()
            seq.slot = self.pool.allocate()
            self.running.append(seq)
        decode = [s for s in self.running if not s.prefilling]
        prefill, budget = [], self.prefill_chunk
        for seq in self.running:
            if budget == 0:
                break
            if seq.prefilling:
                n = min(len(seq.prompt_ids) - seq.num_cached, budget)
                prefill.append((seq, seq.num_cached, n))
                budget -= n
        return StepPlan(prefill, decode)
