"""The page allocator for paged K/V (issue 18): softmax layers keep their keys and values in
fixed-size pages of `page_size` tokens, so the pool holds as many sequences as their actual
lengths allow instead of reserving `max_context` per sequence.

Host-side bookkeeping only (no K/V tensors here): which pages each sequence owns, in order, and
how many holders each page has. The K/V tensors of a softmax layer are `[num_pages, Hkv,
page_size, D]` (`kv_page_shape`), and a sequence's token at position p lives in page
`pages[p // page_size]` at offset `p % page_size` (ops/paged_attention reads them through the
block table).

Refcounts let a prefix cache share pages: `allocate(seq, length, prefix=pages)` starts a
sequence on existing pages (each gains a holder), `retain`/`release` let the cache hold pages
itself. Only full pages may be shared, and nobody writes into a page with more than one holder
(`slot_mapping` refuses), so no copy-on-write is needed.

Page 0 is the null page: never handed out, it pads block tables and absorbs the writes of a
padded batch row, so every launch stays in bounds with fixed shapes (CUDA graphs).

Out of pages raises `OutOfPages` (nothing changed), which the engine answers by preempting."""

from __future__ import annotations

from collections import Counter

import torch

__all__ = ["NULL_PAGE", "OutOfPages", "PagePool", "kv_page_shape", "pages_for"]

NULL_PAGE = 0


class OutOfPages(RuntimeError):
    """Not enough free pages for a request; `needed` and `free` say by how much."""

    def __init__(self, needed: int, free: int):
        super().__init__(f"out of K/V pages: need {needed}, {free} free")
        self.needed, self.free = needed, free


def pages_for(length: int, page_size: int) -> int:
    """Pages that hold `length` tokens."""
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    return -(-length // page_size)


def kv_page_shape(num_pages: int, kv_heads: int, page_size: int, head_dim: int) -> tuple:
    """The shape of one softmax layer's key (or value) pages, as ops/paged_attention reads them."""
    return (num_pages, kv_heads, page_size, head_dim)


class PagePool:
    """`num_pages` pages of `page_size` tokens (page 0 reserved as the null page, so
    `num_pages - 1` usable); sequences are keyed by any hashable id."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is the null page), got {num_pages}")
        if page_size <= 0:
            raise ValueError(f"page_size must be > 0, got {page_size}")
        self.num_pages, self.page_size = num_pages, page_size
        self.refcount = [0] * num_pages
        self.refcount[NULL_PAGE] = 1  # held forever
        self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low pages first
        self._pages: dict = {}    # seq -> [page, ...]
        self._lengths: dict = {}  # seq -> tokens the sequence's pages hold
        self._held = Counter()    # page -> holds by retain() (a prefix cache)

    # ---- capacity (the planner and the scheduler ask these) ----
    @property
    def capacity(self) -> int:
        """Usable pages (all but the null page)."""
        return self.num_pages - 1

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages_needed(self, length: int) -> int:
        return pages_for(length, self.page_size)

    def extra_pages(self, seq, new_length: int) -> int:
        """New pages growing `seq` to `new_length` takes (a sequence not yet allocated: all of
        `pages_needed(new_length)`)."""
        have = len(self._pages.get(seq, ()))
        return max(0, self.pages_needed(new_length) - have)

    def can_fit(self, seq, new_length: int) -> bool:
        return self.extra_pages(seq, new_length) <= self.free_pages

    # ---- sequences ----
    def __contains__(self, seq) -> bool:
        return seq in self._pages

    def pages(self, seq) -> list[int]:
        return list(self._get(seq))

    def length(self, seq) -> int:
        self._get(seq)
        return self._lengths[seq]

    def allocate(self, seq, length: int, prefix: list[int] | tuple = ()) -> list[int]:
        """Start `seq` with room for `length` tokens; its first pages are `prefix` (shared full
        pages, e.g. from a prefix cache, each gaining a holder), the rest fresh."""
        if seq in self._pages:
            raise ValueError(f"sequence {seq!r} is already allocated")
        prefix = [int(p) for p in prefix]
        if len(prefix) * self.page_size > length:
            raise ValueError(f"prefix of {len(prefix)} pages holds more than length={length} "
                             f"tokens (shared pages must be full)")
        for p in prefix:
            if not 0 < p < self.num_pages or self.refcount[p] == 0:
                raise ValueError(f"prefix page {p} is not allocated")
        fresh = self._take(self.pages_needed(length) - len(prefix))
        for p in prefix:
            self.refcount[p] += 1
        self._pages[seq] = prefix + fresh
        self._lengths[seq] = length
        return self.pages(seq)

    def extend(self, seq, new_length: int) -> list[int]:
        """Grow `seq` to `new_length` tokens; returns the pages added. OutOfPages leaves it as
        it was."""
        pages = self._get(seq)
        if new_length < self._lengths[seq]:
            raise ValueError(f"extend to {new_length} < current length {self._lengths[seq]}; "
                             f"use truncate")
        fresh = self._take(self.pages_needed(new_length) - len(pages))
        pages.extend(fresh)
        self._lengths[seq] = new_length
        return fresh

    def truncate(self, seq, new_length: int) -> None:
        """Shrink `seq` to `new_length` tokens, dropping the pages past it."""
        pages = self._get(seq)
        if not 0 <= new_length <= self._lengths[seq]:
            raise ValueError(f"truncate to {new_length} outside 0..{self._lengths[seq]}")
        keep = self.pages_needed(new_length)
        self._drop(pages[keep:])
        del pages[keep:]
        self._lengths[seq] = new_length

    def free(self, seq) -> None:
        """Release `seq`'s hold on its pages (pages nobody else holds become free)."""
        self._drop(self._get(seq))
        del self._pages[seq], self._lengths[seq]

    # ---- holders other than sequences (a prefix cache) ----
    def retain(self, pages) -> None:
        """Hold `pages` (allocated ones) beyond the sequences using them."""
        pages = [int(p) for p in pages]
        for p in pages:
            if not 0 < p < self.num_pages or self.refcount[p] == 0:
                raise ValueError(f"page {p} is not allocated")
        for p in pages:
            self.refcount[p] += 1
            self._held[p] += 1

    def release(self, pages) -> None:
        """Drop holds taken by `retain`."""
        pages = [int(p) for p in pages]
        want = Counter(pages)
        for p, n in want.items():
            if self._held[p] < n:
                raise ValueError(f"page {p} is not retained (held {self._held[p]}x)")
        for p in pages:
            self._held[p] -= 1
            if not self._held[p]:
                del self._held[p]
        self._drop(pages)

    # ---- tensors for the kernels ----
    def block_table(self, seqs, width: int | None = None, device=None) -> torch.Tensor:
        """int32 [len(seqs), width]: row n lists seqs[n]'s pages, padded with the null page
        (None in seqs: an all-null padding row). `width` defaults to the longest row."""
        rows = [self._get(s) if s is not None else [] for s in seqs]
        need = max((len(r) for r in rows), default=0)
        width = need if width is None else width
        if width < need:
            raise ValueError(f"block table width {width} < {need} pages of the longest sequence")
        table = torch.full((len(rows), max(width, 1)), NULL_PAGE, dtype=torch.int32)
        for n, r in enumerate(rows):
            table[n, :len(r)] = torch.tensor(r, dtype=torch.int32)
        return table.to(device) if device is not None else table

    def slot_mapping(self, seq, start: int, end: int, device=None) -> torch.Tensor:
        """int64 [end - start]: the flat slots (page * page_size + offset) of positions
        start..end-1 of `seq`, where `write_kv` puts their keys and values. Refuses positions in
        a page someone else also holds (shared prefix pages are read-only)."""
        pages = self._get(seq)
        if not 0 <= start <= end <= self._lengths[seq]:
            raise ValueError(f"positions {start}..{end} outside 0..{self._lengths[seq]} of "
                             f"sequence {seq!r}")
        ps = self.page_size
        for i in range(start // ps, pages_for(end, ps)):
            if self.refcount[pages[i]] > 1:
                raise ValueError(f"position range {start}..{end} of {seq!r} writes shared page "
                                 f"{pages[i]} (shared pages are read-only)")
        pos = torch.arange(start, end)
        page = torch.tensor(pages, dtype=torch.int64)[pos // ps] if end > start else pos
        out = page * ps + pos % ps
        return out.to(device) if device is not None else out

    # ---- internals ----
    def _get(self, seq) -> list[int]:
        try:
            return self._pages[seq]
        except KeyError:
            raise KeyError(f"sequence {seq!r} is not allocated") from None

    def _take(self, n: int) -> list[int]:
        if n <= 0:
            return []
        if n > len(self._free):
            raise OutOfPages(n, len(self._free))
        taken = [self._free.pop() for _ in range(n)]
        for p in taken:
            self.refcount[p] = 1
        return taken

    def _drop(self, pages) -> None:
        for p in pages:
            self.refcount[p] -= 1
            if self.refcount[p] == 0:
                self._free.append(p)

    def check(self) -> None:
        """Invariants (tests call it): every refcount equals the page's holders (sequences plus
        retains), free pages have none and are listed once, the null page is never handed out."""
        holders = Counter(self._held)
        for pages in self._pages.values():
            holders.update(pages)
        for p in range(1, self.num_pages):
            if self.refcount[p] != holders[p]:
                raise AssertionError(f"page {p}: refcount {self.refcount[p]}, {holders[p]} holders")
        free = set(self._free)
        if len(free) != len(self._free) or NULL_PAGE in free:
            raise AssertionError("free list has duplicates or the null page")
        for p in range(1, self.num_pages):
            if (p in free) != (self.refcount[p] == 0):
                raise AssertionError(f"page {p}: free={p in free} refcount={self.refcount[p]}")
        for s, pages in self._pages.items():
            if len(pages) != self.pages_needed(self._lengths[s]):
                raise AssertionError(f"sequence {s!r}: {len(pages)} pages for "
                                     f"{self._lengths[s]} tokens")
            if len(set(pages)) != len(pages) or NULL_PAGE in pages:
                raise AssertionError(f"sequence {s!r} holds a page twice or the null page")

