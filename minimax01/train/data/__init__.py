"""Training data: sources (files, folders, HF `save_to_disk` datasets, the standard library,
synthetic tasks), packing into rows with `cu_seqlens`, and the data-parallel view of the batch.

`TrainData` is what the trainer uses: `next_batch()` gives this rank's rows of the next global
micro-batch, `state_dict()` is the data position saved in checkpoints, `eval_batches()` the
fixed held-out set."""

from __future__ import annotations

from ..config import RunConfig
from .packing import IGNORE_INDEX, Packer, TokenStream, collate, held_out
from .sources import JsonlFile, open_source
from .synthetic import TASKS, Example, make_example

__all__ = ["TrainData", "TokenStream", "Packer", "collate", "held_out", "open_source",
           "make_example", "Example", "TASKS", "IGNORE_INDEX"]


class _Quiet(dict):
    """A bad-line record that never reaches the warning (ranks other than the first)."""

    def __len__(self) -> int:
        return 0

    def __contains__(self, key) -> bool:
        return True


class TrainData:
    """Every rank packs the same global stream and keeps its own slice of rows, so the global
    batch - and the loss curve - do not depend on the number of ranks."""

    def __init__(self, cfg: RunConfig, tokenizer, dp_rank: int = 0, dp_size: int = 1,
                 pad_id: int | None = None):
        t, d = cfg.train, cfg.data
        if t.batch_size % dp_size:
            raise ValueError(f"train.batch_size={t.batch_size} must be a multiple of the "
                             f"data-parallel size {dp_size}")
        self.cfg, self.tok = cfg, tokenizer
        self.rows, self.seq_len = t.batch_size, t.seq_len
        self.local = t.batch_size // dp_size
        self.first = dp_rank * self.local
        self.pad_id = pad_id if pad_id is not None else (tokenizer.pad_id or 0)
        length = d.synthetic_length or t.seq_len
        chat_shard = None
        if d.format == "chat":  # conversations, assistant tokens learned (chat_data.py)
            from pathlib import Path

            from .chat import ChatRenderer
            from .chat_data import ChatJsonlFile

            template = None
            if d.chat_template:
                if not Path(d.chat_template).is_file():
                    raise ValueError(f"data.chat_template: no file at {d.chat_template}")
                template = Path(d.chat_template).read_text(encoding="utf-8")
            renderer = ChatRenderer(tokenizer, template)

            def chat_shard(path, name, strict):
                return ChatJsonlFile(path, name, renderer, strict)
        self.shards = open_source(d.source, d.format, d.text_field, d.synthetic_tasks, length,
                                  t.seed, strict=d.strict, chat_shard=chat_shard)
        if dp_rank:  # one warning per bad line, from the first rank only
            for shard in self.shards:
                if isinstance(shard, JsonlFile):
                    shard.bad = _Quiet()
        self.stream = self._stream("train")
        self.packer = self._packer(self.stream)
        if d.length_mixture:  # rows drawn by document length (train/data/mixture.py)
            from .mixture import LengthMixture

            self.stream = self.packer = LengthMixture(
                self.shards, tokenizer, d.length_mixture, t.seq_len, self.pad_id, t.seed,
                d.eval_fraction, d.shuffle, d.add_bos, d.add_eos)

    def _packer(self, stream: TokenStream):
        if self.cfg.data.format == "chat":
            from .chat_data import ChatPacker

            return ChatPacker(stream, self.seq_len, self.pad_id)
        return Packer(stream, self.seq_len, self.pad_id)

    def _stream(self, split: str) -> TokenStream:
        d = self.cfg.data
        return TokenStream(self.shards, self.tok, split, d.eval_fraction, self.cfg.train.seed,
                           d.shuffle, d.add_bos, d.add_eos)

    def next_batch(self) -> dict:
        rows = [self.packer.next_row() for _ in range(self.rows)]
        return collate(rows[self.first:self.first + self.local])

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    def check(self) -> None:
        """Fail early (one clear line) when the training split yields no tokens."""
        probe = self._packer(self._stream("train"))
        if probe.next_row() is None:
            raise ValueError(f"data.source {self.cfg.data.source}: no training text")
        if hasattr(self.packer, "check"):
            self.packer.check()

    def eval_batches(self, num_batches: int) -> list[dict]:
        """The first `num_batches` micro-batches of the held-out split (fewer if it is short;
        empty if data.eval_fraction is 0). A short last batch is padded with ignored rows."""
        if self.cfg.data.eval_fraction <= 0:
            return []
        packer = self._packer(self._stream("eval"))
        pad_row = ([self.pad_id] * self.seq_len, [IGNORE_INDEX] * self.seq_len, [self.seq_len])
        batches = []
        for _ in range(num_batches):
            rows = []
            for _ in range(self.rows):
                row = packer.next_row()
                if row is None:
                    break
                rows.append(row)
            if not rows:
                break
            short = len(rows) < self.rows
            rows += [pad_row] * (self.rows - len(rows))
            batches.append(collate(rows[self.first:self.first + self.local]))
            if short:
                break
        if not batches:
            raise ValueError(f"data.source {self.cfg.data.source}: the held-out split "
                             f"(data.eval_fraction={self.cfg.data.eval_fraction}) has no text; "
                             f"raise data.eval_fraction, or set it to 0 to train without "
                             f"evaluation")
        return batches
