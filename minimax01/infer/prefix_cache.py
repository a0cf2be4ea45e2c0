"""Prefix caching over hybrid states: a new request resumes from the longest cached prefix.

A lightning layer's whole past is one fixed-size state, so a prefix of n tokens is resumable from
a *snapshot*: every lightning layer's state after token n, plus the softmax layers' K/V of tokens
[0, n). Prompts are cut into blocks of `block_size` tokens; block j is keyed by (its parent's
node, its tokens) -- a hash chain whose keys are exact, so two prefixes share a node only if all
their tokens are equal (no hash collision can serve wrong state). Every node holds its block's
K/V (shared by all longer prefixes); a node where a prefill chunk ended also holds the lightning
states at that boundary, and only such nodes are resume points. The scheduler cuts prefill
chunks at block boundaries (infer/scheduler.py) so that snapshots exist.

Two halves, so tensor parallelism stays simple:
  * `PrefixCache` (rank 0): the policy -- lookup, LRU over leaves, the memory budget. It never
    touches tensors; it emits integer operations (load / drop / save) that go into the step's
    StepRecord, and every rank applies them to its own `PrefixStore` (its heads' slices), in the
    same order, so all ranks hold the same nodes.
  * `PrefixStore` (every rank): node id -> tensors; applies the operations between the slot
    pool and the cached copies.

Eviction is LRU over leaves (a node nobody extends): evicting an inner node would orphan longer
prefixes. A save that cannot fit after evicting every unpinned leaf is skipped."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .slot_cache import SlotPool

DROP, SAVE_KV, SAVE_STATE = 0, 1, 2
DEFAULT_BLOCK_SIZE = 256        # tokens per cache block: resume points are multiples of it
DEFAULT_PREFIX_CACHE_GIB = 4.0  # memory for cached prefixes (per rank under tensor parallelism)


@dataclass
class Node:
    id: int
    parent: "Node | None"
    tokens: tuple[int, ...]
    has_state: bool = False
    children: int = 0
    last_used: int = 0
    key: tuple = field(default=(), repr=False)


class PrefixCache:
    """Policy on rank 0. `load(tokens, slot)` at admission; `save(tokens, end, slot)` when a
    chunk ends at a block boundary; `take_ops()` empties the pending operations into a step."""

    def __init__(self, pool: SlotPool, block_size: int = DEFAULT_BLOCK_SIZE,
                 budget_bytes: int = 1 << 30):
        if block_size <= 0:
            raise ValueError(f"prefix cache block size must be positive, got {block_size}")
        if budget_bytes < 0:
            raise ValueError(f"prefix cache budget must be >= 0 bytes, got {budget_bytes}")
        self.block_size, self.budget_bytes = block_size, budget_bytes
        self.kv_bytes, self.state_bytes = block_bytes(pool, block_size)
        self.nodes: dict[tuple, Node] = {}
        self.used_bytes = 0
        self._next_id = 0
        self._clock = 0
        self.loads: dict[int, list[int]] = {}    # slot -> node ids of the chain to copy in
        self.saves: list[int] = []               # (id, slot, block, flags) flattened, in order;
                                                 # flags 0 drops the node
        self.stats = {"lookups": 0, "hits": 0, "lookup_tokens": 0, "hit_tokens": 0,
                      "evicted_nodes": 0, "saved_blocks": 0}

    # ------------------------------------------------------------------ lookup
    def _walk(self, tokens: list[int], max_blocks: int) -> list[Node]:
        chain, parent, bs = [], None, self.block_size
        for j in range(max_blocks):
            node = self.nodes.get((parent.id if parent else -1, tuple(tokens[j * bs:(j + 1) * bs])))
            if node is None:
                break
            chain.append(node)
            parent = node
        return chain

    def load(self, tokens: list[int], slot: int) -> int:
        """Longest cached resume point of `tokens` (at most len - 1 tokens: the last one must
        run to give logits); queues its copy into `slot`. Returns the tokens it covers."""
        self.stats["lookups"] += 1
        self.stats["lookup_tokens"] += len(tokens)
        chain = self._walk(tokens, (len(tokens) - 1) // self.block_size)
        while chain and not chain[-1].has_state:
            chain.pop()
        if not chain:
            return 0
        self._clock += 1
        for node in chain:
            node.last_used = self._clock
        self.loads[slot] = [n.id for n in chain]
        hit = len(chain) * self.block_size
        self.stats["hits"] += 1
        self.stats["hit_tokens"] += hit
        return hit

    def cancel_load(self, slot: int) -> None:
        self.loads.pop(slot, None)

    # ------------------------------------------------------------------ insert
    def save(self, tokens: list[int], end: int, slot: int) -> None:
        """`slot` holds `tokens[:end]` (end a multiple of the block size): cache its blocks'
        K/V where missing and the lightning states at `end`."""
        bs = self.block_size
        if end <= 0 or end % bs:
            raise ValueError(f"prefix cache snapshots sit at multiples of {bs}, got {end}")
        k = end // bs
        chain = self._walk(tokens, k)
        last_has_state = len(chain) == k and chain[-1].has_state
        need = (k - len(chain)) * self.kv_bytes + (0 if last_has_state else self.state_bytes)
        self._clock += 1
        for node in chain:
            node.last_used = self._clock
        if need and not self._make_room(need, {id(n) for n in chain}):
            return
        parent = chain[-1] if chain else None
        for j in range(len(chain), k):
            block = tuple(tokens[j * bs:(j + 1) * bs])
            node = Node(self._next_id, parent, block, last_used=self._clock,
                        key=(parent.id if parent else -1, block))
            self._next_id += 1
            self.nodes[node.key] = node
            if parent is not None:
                parent.children += 1
            self.saves += [node.id, slot, j, SAVE_KV]
            self.used_bytes += self.kv_bytes
            self.stats["saved_blocks"] += 1
            chain.append(node)
            parent = node
        if not last_has_state:
            chain[-1].has_state = True
            self.saves += [chain[-1].id, slot, k - 1, SAVE_STATE]
            self.used_bytes += self.state_bytes

    def _make_room(self, need: int, pinned: set[int]) -> bool:
        while self.used_bytes + need > self.budget_bytes:
            leaves = [n for n in self.nodes.values() if n.children == 0 and id(n) not in pinned]
            if not leaves:
                return False
            # useless first (a leaf without a resume point), then least recently used
            victim = min(leaves, key=lambda n: (n.has_state, n.last_used))
            self._evict(victim)
        return True

    def _evict(self, node: Node) -> None:
        del self.nodes[node.key]
        if node.parent is not None:
            node.parent.children -= 1
        self.used_bytes -= self.kv_bytes + (self.state_bytes if node.has_state else 0)
        self.saves += [node.id, -1, -1, DROP]
        self.stats["evicted_nodes"] += 1

    def clear(self) -> None:
        """Drop every node (the pending operations say so to the stores)."""
        for node in list(self.nodes.values()):
            self.saves += [node.id, -1, -1, DROP]
        self.nodes.clear()
        self.used_bytes = 0

    # ------------------------------------------------------------------ to the step record
    def take_ops(self) -> tuple[list[int], list[int]]:
        """(loads, saves) as flat integer lists: loads [slot, n, id_1..id_n]..., saves (and
        drops) [id, slot, block, flags]... in the order they were decided."""
        loads = []
        for slot, ids in self.loads.items():
            loads += [slot, len(ids), *ids]
        out = (loads, self.saves)
        self.loads, self.saves = {}, []
        return out

    def info(self) -> dict:
        s = self.stats
        return {"block_size": self.block_size, "nodes": len(self.nodes),
                "used_gib": round(self.used_bytes / 2 ** 30, 4),
                "budget_gib": round(self.budget_bytes / 2 ** 30, 4),
                "hit_rate": round(s["hit_tokens"] / s["lookup_tokens"], 4)
                if s["lookup_tokens"] else 0.0, **s}


def block_bytes(pool: SlotPool, block_size: int) -> tuple[int, int]:
    """(K/V bytes of one block, bytes of one snapshot of every lightning state) in `pool`."""
    kv = sum(2 * x.shape[1] * block_size * x.shape[3] * x.element_size()
             for x in pool.keys.values())  # (paged or not: [rows or pages, Hkv, *, D])
    state = sum(x[0].numel() * x.element_size() for x in pool.states.values())
    return kv, state


class PrefixStore:
    """The cached tensors of one rank: node id -> per-softmax-layer K/V of its block, and for
    resume points the lightning states. `apply_before` runs a step's loads (after slot resets,
    before the forwards); `apply_after` its saves and drops, in order (after the forwards)."""

    def __init__(self, pool: SlotPool, block_size: int):
        self.pool, self.block_size = pool, block_size
        self.kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.states: dict[int, list[torch.Tensor]] = {}

    def apply_before(self, loads: list[int]) -> None:
        pool, bs, i = self.pool, self.block_size, 0
        while i < len(loads):
            slot, n = loads[i], loads[i + 1]
            ids = loads[i + 2:i + 2 + n]
            i += 2 + n
            for j, node in enumerate(ids):
                for (k, v), layer in zip(self.kv[node], pool.keys):
                    pool.write_kv(layer, slot, j * bs, k, v)
            for s, layer in zip(self.states[ids[-1]], pool.states):
                pool.states[layer][slot] = s
            pool.lengths[slot] = n * bs

    def apply_after(self, saves: list[int]) -> None:
        pool, bs = self.pool, self.block_size
        for i in range(0, len(saves), 4):
            node, slot, j, flags = saves[i:i + 4]
            if flags == DROP:
                self.kv.pop(node, None)
                self.states.pop(node, None)
            if flags & SAVE_KV:
                self.kv[node] = [tuple(x.clone() for x in pool.read_kv(l, slot, j * bs,
                                                                       (j + 1) * bs))
                                 for l in pool.keys]
            if flags & SAVE_STATE:
                self.states[node] = [pool.states[l][slot].clone() for l in pool.states]

    def memory_bytes(self) -> int:
        return (sum(t.numel() * t.element_size() for kv in self.kv.values() for p in kv for t in p)
                + sum(t.numel() * t.element_size() for s in self.states.values() for t in s))
