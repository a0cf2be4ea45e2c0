"""The serving engine's cache: a fixed pool of slots, allocated once, and the per-step records
the model talks to (`prepare`, `lightning`, `attend`, `commit`; see model/cache.py).

A slot holds one sequence: an fp32 lightning state [H, D, D] per lightning layer (constant size,
whatever the context) and post-RoPE K/V [Hkv, max_context, D] per softmax layer. One extra
scratch slot (index `num_slots`) absorbs the padding rows of a padded decode batch.

`SlotCache` picks the kernels once; each forward gets a small step record, which is the cache
the model is called with:
  * `begin_prefill(...) -> PrefillStep`: B == 1 packed input with `cu_seqlens`; document n is the
    next chunk of the prompt of the sequence in `slots[n]`, continuing from what that slot holds
    (lightning: the slot's state as `initial_state` of one varlen call; softmax: the chunk's
    queries see the slot's cached keys and their own);
  * `begin_decode(...) -> DecodeStep`: [B, 1] input, one token per sequence, rows of the pools
    picked by `slot_idx`. Every tensor it touches is device-resident and fixed in shape, so the
    step can be captured in a CUDA graph (the record of a captured step lives on with its graph).
Each record holds only what its mode needs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import LINEAR, SLIDING, ModelConfig
from ..ops import lightning_attn, lightning_decode
from ..ops.lightning import triton_available
from ..ops.paged_attention import paged_attention, write_kv
from ..ops.prefill_attention import flash_supported, plan, prefill_attention
from ..ops.slot_attention import decode_splits, slot_attention, triton_supported, work_list
from ..ops.slot_attention.work import work_lists
from .h2d import StepTensors
from .pool import OutOfPages, PagePool, kv_page_shape, pages_for


def lightning_backend(device: torch.device) -> str:
    """The Triton lightning kernels on CUDA when Triton is installed, the torch forms otherwise."""
    return "triton" if device.type == "cuda" and triton_available(device) else "chunk"


def check_servable(config: ModelConfig) -> None:
    """The slot pool keeps every softmax layer's whole context and the slot kernels attend over
    all of it: sliding-window layers are refused (generate() and HybridCache run them)."""
    for i, kind in enumerate(config.layer_types):
        if kind == SLIDING:
            raise ValueError(f"SlotCache does not support sliding_attention layers (layer {i}); "
                             f"use generate() / HybridCache")


class SlotPool:
    """Cache memory for `num_slots` sequences of up to `max_context` tokens each.

    Paged (`page_size` given): the softmax layers' K/V live in `num_pages` pages of `page_size`
    tokens (infer/pool.py hands them out, page 0 the null page) and each slot has a row of
    `block_tables` [num_slots + 1, max_context / page_size] int32 on the device; a slot takes
    pages as it grows (`reserve`), so the pool holds as many sequences as their actual lengths
    allow. Rank 0 decides the pages; `take_page_updates` / `apply_page_updates` carry the
    changed rows to every rank's tables (in the StepRecord)."""

    def __init__(self, config: ModelConfig, num_slots: int, max_context: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 page_size: int | None = None, num_pages: int | None = None):
        if num_slots <= 0 or max_context <= 0:
            raise ValueError(f"SlotPool needs num_slots > 0 and max_context > 0, got "
                             f"{num_slots} and {max_context}")
        if page_size is not None and page_size <= 0:
            raise ValueError(f"kv page size must be positive, got {page_size}")
        h, d, hkv = config.num_attention_heads, config.head_dim, config.num_key_value_heads
        self.config, self.num_slots, self.max_context = config, num_slots, max_context
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        rows = num_slots + 1  # + scratch
        self.states: dict[int, torch.Tensor] = {}
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        check_servable(config)
        self.page_size, self.pages = page_size, None
        if page_size is not None:
            width = pages_for(max_context, page_size)
            num_pages = num_pages or num_slots * width + 1  # default: the slot pool's memory
            self.pages = PagePool(num_pages, page_size)
            self.block_tables = torch.zeros(rows, width, dtype=torch.int32, device=self.device)
            self._dirty: set[int] = set()
        for i, kind in enumerate(config.layer_types):
            if kind == LINEAR:
                self.states[i] = torch.zeros(rows, h, d, d, device=self.device, dtype=torch.float32)
            elif page_size is not None:
                self.keys[i] = torch.zeros(kv_page_shape(num_pages, hkv, page_size, d),
                                           device=self.device, dtype=dtype)
                self.values[i] = torch.zeros_like(self.keys[i])
            else:  # never read past a slot's length, so no need to zero
                self.keys[i] = torch.empty(rows, hkv, max_context, d, device=self.device, dtype=dtype)
                self.values[i] = torch.empty_like(self.keys[i])
        self.lengths = torch.zeros(rows, dtype=torch.int32, device=self.device)  # cached tokens
        self.scratch = num_slots
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """A fresh slot (zero state, nothing cached); IndexError when the pool is full."""
        if not self._free:
            raise IndexError("no free cache slot")
        slot = self._free.pop()
        self.reset(slot)
        return slot

    def reset(self, slot: int) -> None:
        """Empty a slot (zero lightning state, nothing cached); what `allocate` does to the slot
        it returns (tensor-parallel ranks without a scheduler call it, infer/tp_engine.py)."""
        for s in self.states.values():
            s[slot].zero_()
        self.lengths[slot] = 0

    @property
    def paged(self) -> bool:
        return self.pages is not None

    @property
    def max_sequence_tokens(self) -> int:
        """The longest sequence the pool can hold (alone)."""
        if self.pages is None:
            return self.max_context
        return min(self.max_context, self.pages.capacity * self.page_size)

    def reserve(self, slot: int, num_tokens: int) -> bool:
        """Room for `num_tokens` tokens in `slot`? The scheduler asks before each step and
        preempts when it is refused: a paged pool takes pages here (False when they run out);
        a slot of the unpaged pool always has room for max_context."""
        if num_tokens > self.max_context:
            return False
        if self.pages is None:
            return True
        try:
            if slot not in self.pages:
                self.pages.allocate(slot, num_tokens)
            elif num_tokens > self.pages.length(slot):
                if not self.pages.extend(slot, num_tokens):
                    return True  # the pages it has hold it
            else:
                return True
        except OutOfPages:
            return False
        self._dirty.add(slot)
        return True

    def release(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots or slot in self._free:
            raise ValueError(f"slot {slot} is not allocated")
        if self.pages is not None and slot in self.pages:
            self.pages.free(slot)
            self._dirty.add(slot)
        self._free.append(slot)

    def take_page_updates(self) -> list[int]:
        """The block-table rows changed since the last call: [slot, n, page_1..page_n]..."""
        if self.pages is None:
            return []
        out = []
        for slot in sorted(self._dirty):
            pages = self.pages.pages(slot) if slot in self.pages else []
            out += [slot, len(pages), *pages]
        self._dirty.clear()
        return out

    def apply_page_updates(self, ints: list[int]) -> None:
        """Set block-table rows from `take_page_updates` (every rank, before the forwards)."""
        i, width = 0, self.block_tables.shape[1]
        while i < len(ints):
            slot, n = ints[i], ints[i + 1]
            if n > width:
                raise ValueError(f"block table row of {n} pages, the table has {width}")
            row = torch.zeros(width, dtype=torch.int32)
            row[:n] = torch.tensor(ints[i + 2:i + 2 + n], dtype=torch.int32)
            self.block_tables[slot] = row.to(self.device, non_blocking=True)
            i += 2 + n

    def kv_flat(self, slot: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Paged: the flat page slots (page * page_size + offset) of positions `pos` of `slot`."""
        ps = self.page_size
        return self.block_tables[slot, pos // ps].long() * ps + pos % ps

    def read_kv(self, layer: int, slot: int, start: int, end: int):
        """(keys, values) [Hkv, end - start, D] of positions start..end-1 of `slot`."""
        keys, values = self.keys[layer], self.values[layer]
        if self.pages is None:
            return keys[slot, :, start:end], values[slot, :, start:end]
        pos = torch.arange(start, end, device=self.device)
        flat = self.kv_flat(torch.full_like(pos, slot), pos)
        ps = self.page_size
        return (keys[flat // ps, :, flat % ps].transpose(0, 1),
                values[flat // ps, :, flat % ps].transpose(0, 1))

    def write_kv(self, layer: int, slot: int, start: int, k: torch.Tensor,
                 v: torch.Tensor) -> None:
        """Store k, v [Hkv, n, D] at positions start..start+n-1 of `slot`."""
        keys, values = self.keys[layer], self.values[layer]
        end = start + k.shape[1]
        if self.pages is None:
            keys[slot, :, start:end], values[slot, :, start:end] = k, v
            return
        pos = torch.arange(start, end, device=self.device)
        flat = self.kv_flat(torch.full_like(pos, slot), pos)
        write_kv(keys, values, k.transpose(0, 1), v.transpose(0, 1), flat)

    def memory_bytes(self) -> int:
        tensors = [*self.states.values(), *self.keys.values(), *self.values.values()]
        return sum(x.numel() * x.element_size() for x in tensors)


class SlotCache:
    """The kernels for a SlotPool (softmax: "triton" or "torch"; lightning: "triton" or "chunk")
    and the factory of the per-forward step records.

    Prefill's softmax attention: the auto choice (`attention=None`) and `attention="flash"` run it
    through FlashAttention varlen (ops/prefill_attention) when this torch has varlen_attn and the
    pool is fp16/bf16 on CUDA (`prefill_flash`); decode keeps the Triton kernel. An explicit
    "triton" or "torch" runs that kernel for both."""

    def __init__(self, pool: SlotPool, attention: str | None = None, lightning: str | None = None,
                 wrap_decode=None, wrap_prefill=None):
        self.pool = pool
        self.wrap_decode = wrap_decode  # e.g. infer/fused_decode.fused: decode records, fused
        self.wrap_prefill = wrap_prefill  # e.g. infer/fused_prefill.fused_prefill
        dev = pool.device
        probe = torch.empty(1, 1, pool.config.head_dim, device=dev, dtype=pool.dtype)
        keys = next(iter(pool.keys.values()), None)
        self.prefill_flash = (attention in (None, "flash") and keys is not None
                              and flash_supported(probe, keys))
        if attention is None or attention == "flash":
            attention = ("triton" if dev.type == "cuda" and keys is not None
                         and triton_supported(probe, keys) else "torch")
        self.attention = attention
        self.lightning_backend = lightning or lightning_backend(dev)
        self.decode_backend = "triton" if self.lightning_backend == "triton" else "torch"
        self._decode_aux: dict[int, tuple] = {}

    def begin_prefill(self, slots: list[int], starts: list[int], lengths: list[int],
                      tokens: list[int] | None = None,
                      keep: list[int] | None = None) -> "PrefillStep":
        """Packed chunk lengths[n] for slot slots[n], which already caches starts[n] tokens. The
        record's `cu_seqlens` (int32) goes to the forward with `cache=record`. `tokens` (the
        packed input ids) and `keep` (positions whose logits are wanted) ride along: the
        record's `input_ids` [1, T] and `keep`. Every index tensor of the step is computed on
        the host and reaches the device in ONE pinned, non-blocking copy (infer/h2d.py), so
        starting a prefill never waits for the GPU."""
        if any(s + n > self.pool.max_context for s, n in zip(starts, lengths)):
            raise ValueError(f"a prefill chunk would pass max_context={self.pool.max_context}")
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        total = offsets[-1]
        # absolute position of each packed token inside its sequence, and its slot
        token_pos = [s + i for s, n in zip(starts, lengths) for i in range(n)]
        token_slot = [slot for slot, n in zip(slots, lengths) for _ in range(n)]
        block_m = self._prefill_block_m()
        triton = self.attention == "triton" and not self.prefill_flash  # else flash plans in forward
        docs, firsts = work_lists(lengths, block_m) if triton else ([], [])
        parts = {"slots": slots, "starts": starts, "lengths": lengths, "cu": offsets,
                 "pos": token_pos, "slot": token_slot, "docs": docs, "firsts": firsts,
                 "tokens": tokens or [], "keep": keep or []}
        t = StepTensors(parts, self.pool.device)
        work = (t.int32("docs"), t.int32("firsts")) if triton else None
        step = PrefillStep(self, list(slots), list(starts), list(lengths), t.long("slots"),
                           t.int32("starts"), t.int32("lengths"), t.int32("cu"), t.long("pos"),
                           t.long("slot"), work, block_m)
        if tokens is not None:
            if len(tokens) != total:
                raise ValueError(f"{len(tokens)} prefill tokens for chunks of {total}")
            step.input_ids = t.long("tokens")[None]
        if keep is not None:
            step.keep = t.long("keep")
        return self.wrap_prefill(step) if self.wrap_prefill is not None else step

    def _prefill_block_m(self) -> int:
        g = self.pool.config.num_attention_heads // self.pool.config.num_key_value_heads
        rows = 128 if self.pool.device.type == "cuda" else 64  # query rows (x heads) per program
        return max(1, rows // g)

    def begin_decode(self, slot_idx: torch.Tensor, active: torch.Tensor,
                     host_lengths: list[int] | None = None) -> "DecodeStep":
        """slot_idx [B] long and active [B] bool on the pool's device (padding rows point at the
        scratch slot with active False). `host_lengths`: cached tokens per row, for the torch
        attention path (the Triton path reads lengths on the device). The small index tensors
        made here are kept per batch size, so CUDA graphs captured with them stay valid."""
        b = slot_idx.shape[0]
        if b not in self._decode_aux:
            dev = slot_idx.device
            hkv = self.pool.config.num_key_value_heads
            self._decode_aux[b] = ((torch.arange(b, dtype=torch.int32, device=dev),
                                    torch.zeros(b, dtype=torch.int32, device=dev)),
                                   torch.ones(b, dtype=torch.int32, device=dev),
                                   decode_splits(b, hkv, self.pool.max_context))
        work, ones, splits = self._decode_aux[b]
        step = DecodeStep(self, slot_idx, active, host_lengths, work, ones, splits)
        return self.wrap_decode(step) if self.wrap_decode is not None else step


@dataclass
class PrefillStep:
    """One packed prefill forward (the model's cache for it)."""

    cache: SlotCache
    slots_list: list[int]
    starts_list: list[int]
    lengths_list: list[int]
    slots: torch.Tensor        # [N] long
    starts: torch.Tensor       # [N] int32: tokens each slot holds before this step
    lengths: torch.Tensor      # [N] int32: this step's tokens per document
    cu_seqlens: torch.Tensor   # [N + 1] int32
    token_pos: torch.Tensor    # [T] absolute position of each packed token
    token_slot: torch.Tensor   # [T] its slot
    work: tuple | None         # the Triton kernel's program list
    block_m: int
    kv_plan: object = None     # the flash path's gather index (ops/prefill_attention.KVPlan)
    input_ids: torch.Tensor | None = None  # [1, T] long, when begin_prefill got the tokens
    keep: torch.Tensor | None = None       # [K] long positions whose logits are kept

    def prepare(self, valid: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
        if cu_seqlens is None or valid.shape != (1, int(self.token_pos.shape[0])):
            raise ValueError("prefill expects the packed [1, T] input built by begin_prefill")
        return self.token_pos[None]

    def lightning(self, layer_idx, q, k, v, slope, ctx):
        states = self.cache.pool.states[layer_idx]
        o, final = lightning_attn(q, k, v, slope, initial_state=states[self.slots],
                                  output_final_state=True, cu_seqlens=self.cu_seqlens,
                                  backend=self.cache.lightning_backend,
                                  max_seqlen=max(self.lengths_list, default=0))
        states.index_copy_(0, self.slots, final.to(states.dtype))
        return o

    def _flash_plan(self, q, keys):
        """The flash gather index of this step (ops/prefill_attention), built by the first softmax
        layer and shared by the rest; None for the Triton / torch kernel (not chosen, or flash
        refuses these tensors: then the Triton program list is built here)."""
        if self.kv_plan is None:
            pool = self.cache.pool
            if not (self.cache.prefill_flash and flash_supported(q, keys)):
                self.kv_plan = False
                if self.work is None and self.cache.attention == "triton":
                    self.work = work_list(self.lengths_list, self.block_m, pool.device)
            else:
                where = (dict(block_table=pool.block_tables[self.slots], page_size=pool.page_size)
                         if pool.paged else dict(slot=self.slots))
                self.kv_plan = plan(self.starts_list, self.lengths_list, q.shape[1],
                                    keys.shape[1], pool.device, cu_q=self.cu_seqlens,
                                    kv_len=self.starts + self.lengths, **where)
        return self.kv_plan or None

    def attend(self, layer_idx, q, k, v, scale, ctx):
        pool = self.cache.pool
        keys, values = pool.keys[layer_idx], pool.values[layer_idx]
        if pool.paged:
            write_kv(keys, values, k[0], v[0], pool.kv_flat(self.token_slot, self.token_pos))
            flash = self._flash_plan(q[0], keys)
            if flash is not None:
                return prefill_attention(q[0], keys, values, flash, scale)[None]
            table = pool.block_tables[self.slots]
            if self.cache.attention == "triton":
                o = paged_attention(q[0], keys, values, table, self.starts, self.lengths, scale,
                                    backend="triton", work=self.work, block_m=self.block_m)
            else:
                o = paged_attention(q[0], keys, values, table, self.starts_list,
                                    self.lengths_list, scale, backend="torch")
            return o[None]
        keys[self.token_slot, :, self.token_pos] = k[0].to(keys.dtype)
        values[self.token_slot, :, self.token_pos] = v[0].to(values.dtype)
        flash = self._flash_plan(q[0], keys)
        if flash is not None:
            return prefill_attention(q[0], keys, values, flash, scale)[None]
        if self.cache.attention == "triton":
            o = slot_attention(q[0], keys, values, self.slots.to(torch.int32), self.starts,
                               self.lengths, scale, backend="triton", work=self.work,
                               block_m=self.block_m)
        else:
            o = slot_attention(q[0], keys, values, self.slots_list, self.starts_list,
                               self.lengths_list, scale, backend="torch")
        return o[None]

    def commit(self) -> None:
        self.cache.pool.lengths.index_put_((self.slots,), self.starts + self.lengths)


@dataclass
class DecodeStep:
    """One batched decode forward (the model's cache for it)."""

    cache: SlotCache
    slot_idx: torch.Tensor             # [B] long: pool row of each batch row
    active: torch.Tensor               # [B] bool: False for padding rows (scratch slot)
    host_lengths: list[int] | None     # cached tokens per row (torch attention only)
    work: tuple                        # the Triton kernel's program list: one query per row
    ones: torch.Tensor                 # [B] int32 query lengths
    num_splits: int
    pos: torch.Tensor | None = None    # [B] int32 position of this token, set by prepare

    def prepare(self, valid: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
        if valid.shape != (self.slot_idx.shape[0], 1):
            raise ValueError(f"decode expects [{self.slot_idx.shape[0]}, 1] input, got "
                             f"{list(valid.shape)}")
        lengths = self.cache.pool.lengths[self.slot_idx]
        # padding rows restart at 0 so the scratch slot never overflows
        self.pos = torch.where(self.active, lengths, torch.zeros_like(lengths))
        return self.pos.long()[:, None]

    def lightning(self, layer_idx, q, k, v, slope, ctx):
        states = self.cache.pool.states[layer_idx]
        o = lightning_decode(q[:, 0], k[:, 0], v[:, 0], states, slope, slot_idx=self.slot_idx,
                             backend=self.cache.decode_backend)
        return o[:, None]

    def attend(self, layer_idx, q, k, v, scale, ctx):
        pool = self.cache.pool
        keys, values = pool.keys[layer_idx], pool.values[layer_idx]
        slot, pos = self.slot_idx, self.pos.long()
        if pool.paged:
            write_kv(keys, values, k[:, 0], v[:, 0], pool.kv_flat(slot, pos))
            table = pool.block_tables[slot]
            if self.cache.attention == "triton":
                o = paged_attention(q[:, 0], keys, values, table, self.pos, self.ones, scale,
                                    backend="triton", work=self.work, block_m=1,
                                    num_splits=self.num_splits)
            else:
                ctx_list = [n if a else 0 for n, a in zip(self.host_lengths,
                                                           self.active.tolist())]
                o = paged_attention(q[:, 0], keys, values, table, ctx_list, [1] * len(ctx_list),
                                    scale, backend="torch")
            return o[:, None]
        keys[slot, :, pos] = k[:, 0].to(keys.dtype)
        values[slot, :, pos] = v[:, 0].to(values.dtype)
        if self.cache.attention == "triton":
            o = slot_attention(q[:, 0], keys, values, slot.to(torch.int32), self.pos, self.ones,
                               scale, backend="triton", work=self.work, block_m=1,
                               num_splits=self.num_splits)
        else:
            ctx_list = [n if a else 0 for n, a in zip(self.host_lengths, self.active.tolist())]
            o = slot_attention(q[:, 0], keys, values, slot.tolist(), ctx_list,
                               [1] * len(ctx_list), scale, backend="torch")
        return o[:, None]

    def commit(self) -> None:
        lengths = self.cache.pool.lengths
        lengths.index_put_((self.slot_idx,), (self.pos + 1).to(lengths.dtype))
