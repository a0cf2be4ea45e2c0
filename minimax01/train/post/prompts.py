"""Prompts for online RL (`train.rl.prompts`): "addition", "addition:D" or "addition:D:MAX"
(the synthetic task of synthetic.py: D-digit operands, sums up to MAX; endless; held-out
problems drawn with another seed, so with few distinct problems they repeat) or a JSONL file
of {"prompt": str | "messages": [...], "answer": ...} (held out by data.eval_fraction). A
prompt's text is what the verifier sees; its tokens are the text (with BOS) or the chat
template's rendering with the generation prompt."""

from __future__ import annotations

from ..data.chat import ChatRenderer
from .records import check_prompt, read_records, split
from .synthetic import addition

HELD_OUT_SEED = 1_000_003


class PromptSet:
    """`get(split, index) -> (text, token ids, answer)` for split "train" or "eval"."""

    def __init__(self, spec: str, tokenizer, seed: int, add_bos: bool, eval_fraction: float):
        self.tok, self.seed, self.add_bos = tokenizer, seed, add_bos
        self.digits = None
        self._chat = None
        if spec == "addition" or spec.startswith("addition:"):
            digits, _, top = spec.partition(":")[2].partition(":")
            if not (digits or "2").isdigit() or not 1 <= int(digits or "2") <= 9 \
                    or not (top or "0").isdigit():
                raise ValueError(f"train.rl.prompts {spec!r}: the synthetic task is addition, "
                                 f"addition:D (D-digit operands, 1..9) or addition:D:MAX "
                                 f"(sums up to MAX)")
            self.digits, self.max_sum = int(digits or "2"), int(top) if top else None
            self.size = None  # endless
        else:
            self.records = read_records(spec, check_prompt)
            self.train_ids, self.eval_ids = split(self.records, spec, eval_fraction)
            if not self.train_ids:
                raise ValueError(f"train.rl.prompts {spec}: every prompt is held out; lower "
                                 f"data.eval_fraction")
            self.size = len(self.train_ids)

    def num_eval(self, wanted: int) -> int:
        return wanted if self.digits is not None else min(wanted, len(self.eval_ids))

    def get(self, which: str, index: int) -> tuple[str, list[int], object]:
        if self.digits is not None:
            seed = self.seed if which == "train" else self.seed + HELD_OUT_SEED
            text, answer = addition(index, seed, self.digits, self.max_sum)
            return text, self.tok.encode(text, add_bos=self.add_bos), answer
        ids = self.train_ids if which == "train" else self.eval_ids
        r = self.records[ids[index % len(ids)]]
        if "prompt" in r:
            text = r["prompt"]
            return text, self.tok.encode(text, add_bos=self.add_bos), r.get("answer")
        if self._chat is None:
            self._chat = ChatRenderer(self.tok)
        text = self._chat.text(r["messages"], add_generation_prompt=True)
        return text, self.tok.encode(text), r.get("answer")
