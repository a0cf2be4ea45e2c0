"""Preference pairs for DPO: JSONL of {"prompt": str | "messages": [...], "chosen", "rejected"}
packed into training rows.

With `prompt` the texts are joined as they are (prompt, then response and EOS); with `messages`
the conversation plus the response as the last assistant turn is rendered by the checkpoint's
chat template (train/data/chat.py ChatRenderer) and the last assistant turn is the response.
`chosen` / `rejected` are strings, or an assistant message (or a list of them) in chat form.
Only the response's tokens count: a sequence's log-prob is the sum over its response tokens.

A pair is two packed documents (chosen, then rejected) in one row, never split across rows;
rows of `seq_len` take whole pairs greedily and the rest is padding in a segment of its own, so
`cu_seqlens` keeps every sequence apart (on CPU the same pairs go as padded rows instead).
Each sequence is cut to seq_len // 2 tokens (the response's end first, then the prompt's
start). Per position, `seq_index` says which sequence's response token is the target there (2k
chosen, 2k+1 rejected for the batch's pair k; -1: none), and `pair_ids` the pairs' dataset
indices (for precomputed reference log-probs)."""

from __future__ import annotations

import random

import torch

from ..data.chat import ChatRenderer
from ..data.packing import IGNORE_INDEX
from .records import check_prompt, read_records, split


def _check_pair(r: dict) -> str | None:
    wrong = check_prompt(r)
    if wrong:
        return wrong
    for key in ("chosen", "rejected"):
        v = r.get(key)
        if isinstance(v, str) or (isinstance(v, dict) and "prompt" not in r):
            continue
        if isinstance(v, list) and "messages" in r and all(isinstance(m, dict) for m in v):
            continue
        return (f"field {key!r} must be a string" + ("" if "prompt" in r else
                " or assistant message(s)"))
    return None


class PairEncoder:
    """A record -> (chosen, rejected), each (tokens, number of prompt tokens), cut to fit."""

    def __init__(self, tokenizer, max_len: int, add_bos: bool = True):
        self.tok, self.max_len, self.add_bos = tokenizer, max_len, add_bos
        self._chat = None
        self.truncated = 0

    def encode(self, r: dict) -> list[tuple[list[int], int]]:
        return [self._one(r, r[k]) for k in ("chosen", "rejected")]

    def _one(self, r: dict, response) -> tuple[list[int], int]:
        if "prompt" in r:
            prompt = self.tok.encode(r["prompt"], add_bos=self.add_bos)
            answer = self.tok.encode(response)
            if self.tok.eos_id is not None:
                answer.append(self.tok.eos_id)
        else:
            if self._chat is None:
                self._chat = ChatRenderer(self.tok)
            turns = [{"role": "assistant", "content": response}] if isinstance(response, str) \
                else [response] if isinstance(response, dict) else list(response)
            ids, mask = self._chat.render(list(r["messages"]) + turns)
            end = len(mask)
            while end and not mask[end - 1]:
                end -= 1
            start = end
            while start and mask[start - 1]:
                start -= 1
            if start == end:
                raise ValueError("a response renders to no assistant tokens")
            prompt, answer = ids[:start], ids[start:end]
        return self._fit(prompt, answer)

    def _fit(self, prompt: list[int], answer: list[int]) -> tuple[list[int], int]:
        if len(prompt) + len(answer) > self.max_len:
            self.truncated += 1
            if len(prompt) > self.max_len // 2:
                prompt = prompt[-(self.max_len // 2):]
            answer = answer[:self.max_len - len(prompt)]
        if not prompt:  # the first token has no context to be predicted from
            prompt, answer = answer[:1], answer[1:]
        return prompt + answer, len(prompt)


def pack_rows(pairs: list[tuple[int, list]], seq_len: int) -> list[list]:
    """Pairs (dataset index, [(tokens, prompt_len)] x 2) -> rows of whole pairs."""
    rows, cur = [], None
    for index, seqs in pairs:
        need = sum(len(t) for t, _ in seqs)
        if cur is None or cur["used"] + need > seq_len:
            cur = {"used": 0, "items": []}
            rows.append(cur)
        cur["items"].append((index, seqs))
        cur["used"] += need
    return [row["items"] for row in rows]


def collate_rows(rows: list[list], seq_len: int, pad_id: int, packed: bool = True) -> dict:
    """Rows of pairs -> input_ids, labels (next-token targets of response tokens, -100
    elsewhere), seq_index, pair_ids, num_pairs; packed: one row [1, R*seq_len] with
    cu_seqlens; else one right-padded row per sequence [2P, longest] (causal attention never
    sees the padding; the CPU lightning path is vectorised over rows, not documents)."""
    seqs, pair_ids = [], []
    for row in rows:
        for index, pair in row:
            k = len(pair_ids)
            pair_ids.append(index)
            for j, (tokens, plen) in enumerate(pair):
                n = len(tokens)
                learn = [plen <= i + 1 < n for i in range(n)]
                seqs.append((tokens, [tokens[i + 1] if m else IGNORE_INDEX
                                      for i, m in enumerate(learn)],
                             [2 * k + j if m else -1 for m in learn]))
    out = {"pair_ids": torch.tensor(pair_ids, dtype=torch.long), "num_pairs": len(pair_ids)}
    fill = (pad_id, IGNORE_INDEX, -1)
    if not packed:
        width = max([len(t) for t, _, _ in seqs] + [1])
        cols = [[s[i] + [fill[i]] * (width - len(s[i])) for s in seqs] or [[fill[i]]]
                for i in range(3)]
    else:
        cols, cu, at = [[], [], []], [0], 0
        for row in rows:
            used = 0
            for _, pair in row:
                for _ in pair:
                    tokens, labels, index = seqs[at]
                    at += 1
                    for c, part in zip(cols, (tokens, labels, index)):
                        c += part
                    cu.append(cu[-1] + len(tokens))
                    used += len(tokens)
            if used < seq_len:  # padding: a segment of its own
                for c, f in zip(cols, fill):
                    c += [f] * (seq_len - used)
                cu.append(cu[-1] + seq_len - used)
        cols = [[c] for c in cols]
        out["cu_seqlens"] = torch.tensor(cu, dtype=torch.int32)
    for name, col in zip(("input_ids", "labels", "seq_index"), cols):
        out[name] = torch.tensor(col, dtype=torch.long)
    return out


class PreferenceData:
    """The trainer's data for `train.objective = "dpo"` (the TrainData interface): a global
    micro-batch is `train.batch_size` rows; each data-parallel rank keeps its own rows."""

    def __init__(self, cfg, tokenizer, dp_rank: int = 0, dp_size: int = 1, pad_id: int = 0,
                 packed: bool = True):
        t, d = cfg.train, cfg.data
        if t.batch_size % dp_size:
            raise ValueError(f"train.batch_size={t.batch_size} must be a multiple of the "
                             f"data-parallel size {dp_size}")
        self.cfg, self.seq_len, self.pad_id, self.packed = cfg, t.seq_len, pad_id, packed
        self.rows, self.local = t.batch_size, t.batch_size // dp_size
        self.first = dp_rank * self.local
        self.records = read_records(d.source, _check_pair)
        self.shards = [d.source]
        self.encoder = PairEncoder(tokenizer, t.seq_len // 2, d.add_bos)
        self.encoded: dict[int, list] = {}
        self.train_ids, self.eval_ids = split(self.records, d.source, d.eval_fraction)
        self.seed, self.epoch, self.cursor = t.seed, 0, 0
        self.reference: torch.Tensor | None = None  # [N, 2] precomputed reference log-probs

    def pair(self, index: int) -> list:
        if index not in self.encoded:
            try:
                self.encoded[index] = self.encoder.encode(self.records[index])
            except ValueError as e:
                raise ValueError(f"{self.cfg.data.source} record {index + 1}: {e}") from None
        return self.encoded[index]

    def _order(self, epoch: int) -> list[int]:
        ids = list(self.train_ids)
        if self.cfg.data.shuffle:
            random.Random(f"minimax01-dpo/{self.seed}/{epoch}").shuffle(ids)
        return ids

    def next_batch(self) -> dict:
        rows, cur = [], []
        used = 0
        while len(rows) < self.rows:
            order = self._order(self.epoch)
            if self.cursor >= len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
                continue
            index = order[self.cursor]
            seqs = self.pair(index)
            need = sum(len(t) for t, _ in seqs)
            if cur and used + need > self.seq_len:
                rows.append(cur)
                cur, used = [], 0
                continue
            cur.append((index, seqs))
            used += need
            self.cursor += 1
        return self._local(rows)

    def _local(self, rows: list[list]) -> dict:
        batch = collate_rows(rows[self.first:self.first + self.local], self.seq_len, self.pad_id,
                             self.packed)
        if self.reference is not None:
            batch["ref_logps"] = self.reference[batch["pair_ids"]].reshape(-1)
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])

    def check(self) -> None:
        if not self.train_ids:
            raise ValueError(f"data.source {self.cfg.data.source}: no training pairs (all "
                             f"{len(self.records)} held out; lower data.eval_fraction)")

    def batches_of(self, ids: list[int], num_batches: int | None = None) -> list[dict]:
        """Fixed micro-batches over `ids` in order (the last padded with empty rows)."""
        rows = pack_rows([(i, self.pair(i)) for i in ids], self.seq_len)
        out = []
        for start in range(0, len(rows), self.rows):
            chunk = rows[start:start + self.rows]
            chunk += [[]] * (self.rows - len(chunk))
            out.append(self._local(chunk))
            if num_batches is not None and len(out) >= num_batches:
                break
        return out

    def eval_batches(self, num_batches: int) -> list[dict]:
        if self.cfg.data.eval_fraction <= 0 or not self.eval_ids:
            return []
        return self.batches_of(self.eval_ids, num_batches)
