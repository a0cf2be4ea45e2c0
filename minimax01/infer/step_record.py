"""The record of one engine step: exactly what its forwards need, as plain integer lists.

The engine builds it from the scheduler's plan (`Engine.step_record`) and runs it
(`Engine.run_step`); under tensor parallelism rank 0 sends it to the other ranks, which run the
same forwards from it without a scheduler, requests or a tokenizer (infer/tp_engine.py). On the
wire it is one flat int64 vector: the field lengths, then the fields, never a pickle."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass
class StepRecord:
    reset: list[int] = field(default_factory=list)            # slots given to new sequences
    page_tables: list[int] = field(default_factory=list)      # changed block-table rows of a
                                                              # paged pool [slot, n, pages...]
    decode_tokens: list[int] = field(default_factory=list)    # last token of each decode row
    decode_slots: list[int] = field(default_factory=list)
    decode_lengths: list[int] = field(default_factory=list)   # tokens its slot caches
    prefill_ids: list[int] = field(default_factory=list)      # packed prompt chunks
    prefill_slots: list[int] = field(default_factory=list)
    prefill_starts: list[int] = field(default_factory=list)   # tokens each slot caches before
    prefill_lengths: list[int] = field(default_factory=list)
    prefill_keep: list[int] = field(default_factory=list)     # packed positions whose logits
                                                              # are kept (finished prompts)
    cache_loads: list[int] = field(default_factory=list)      # prefix cache -> slots, before
    cache_saves: list[int] = field(default_factory=list)      # slots -> prefix cache, after
                                                              # (infer/prefix_cache.py)

    def encode(self) -> list[int]:
        parts = [getattr(self, f.name) for f in fields(self)]
        out = [len(p) for p in parts]
        for p in parts:
            out += p
        return out

    @classmethod
    def decode(cls, ints: list[int]) -> "StepRecord":
        names = [f.name for f in fields(cls)]
        k = len(names)
        if len(ints) < k:
            raise ValueError(f"step record: {len(ints)} integers, expected at least {k}")
        lengths, pos, values = ints[:k], k, {}
        if any(n < 0 for n in lengths) or k + sum(lengths) != len(ints):
            raise ValueError("step record: field lengths do not match the payload")
        for name, n in zip(names, lengths):
            values[name] = ints[pos:pos + n]
            pos += n
        return cls(**values)

    @property
    def empty(self) -> bool:
        return not (self.reset or self.decode_slots or self.prefill_slots or self.cache_saves
                    or self.page_tables)


def fold_decodes(record: StepRecord) -> StepRecord:
    """The same step with its decode rows moved into the packed prefill, ahead of the prompt
    chunks: each a one-token document continuing its slot (start = the tokens it caches), its
    logits kept. The prefill forward then returns the decode rows' logits, then the finished
    prompts', the order `run_step` returns them in. One pass over the weights instead of two
    (issue 18); the record's other fields are unchanged."""
    n = len(record.decode_slots)
    if not n:
        return record
    return StepRecord(
        reset=record.reset, page_tables=record.page_tables,
        prefill_ids=record.decode_tokens + record.prefill_ids,
        prefill_slots=record.decode_slots + record.prefill_slots,
        prefill_starts=record.decode_lengths + record.prefill_starts,
        prefill_lengths=[1] * n + record.prefill_lengths,
        prefill_keep=list(range(n)) + [k + n for k in record.prefill_keep],
        cache_loads=record.cache_loads, cache_saves=record.cache_saves)
