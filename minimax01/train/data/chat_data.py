"""Chat fine-tuning data (`data.format = "chat"`): JSONL files of `{"messages": [...]}` (and
optionally `"tools": [...]`), one conversation per line, rendered by ChatRenderer (chat.py) into
tokens with an assistant-only loss mask, and packed whole into rows.

`ChatPacker` puts whole conversations into a row while they fit, then pads the rest of the row
(its own segment, nothing predicted), so no conversation is cut across rows and none loses the
context of its answers. Every conversation is its own `cu_seqlens` segment (no attention across
conversations, the lightning state restarts). A conversation longer than a row is cut to the row
(its tail is dropped, counted in `truncated`). A target is a token's successor when that
successor is an assistant token."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .chat import ChatError, ChatRenderer
from .packing import IGNORE_INDEX, TokenStream
from .sources import JsonlFile, Unit


class ChatJsonlFile(JsonlFile):
    """A JSONL file of conversations. A bad line (bad JSON, no `messages`, a conversation the
    template refuses, no assistant token) is skipped with a counted warning naming the line and
    the message at fault, or is an error with `strict`."""

    def __init__(self, path: Path, name: str, renderer: ChatRenderer, strict: bool = False):
        super().__init__(path, name, "messages", strict)
        self.renderer = renderer

    def _unit(self, line: bytes, pos: int) -> tuple[Unit | None, str | None]:
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            return None, f"not UTF-8 (byte {e.start} of the line)"
        except (json.JSONDecodeError, RecursionError) as e:
            return None, f"not valid JSON ({e})"
        if not isinstance(obj, dict) or "messages" not in obj:
            return None, 'not a conversation (an object with "messages")'
        try:
            ids, learn = self.renderer.render(obj["messages"], obj.get("tools"))
        except ChatError as e:
            return None, str(e)
        if not any(learn):
            return None, "no assistant message to learn from"
        return Unit("", pos, True, True, tuple(ids), tuple(learn)), None


class ChatPacker:
    """Rows of whole conversations from a TokenStream of rendered units (the `Packer`
    interface: `next_row()` -> (input_ids, targets, segment lengths) or None)."""

    def __init__(self, stream: TokenStream, seq_len: int, pad_id: int = 0):
        self.stream, self.seq_len, self.pad_id = stream, seq_len, pad_id
        self.truncated = 0

    def next_row(self) -> tuple[list[int], list[int], list[int]] | None:
        t = self.seq_len
        inputs: list[int] = []
        targets: list[int] = []
        lengths: list[int] = []
        while len(inputs) < t:
            got = self.stream.peek_unit()
            if got is None:
                break
            toks, learn = got
            if len(toks) > t - len(inputs):
                if inputs:  # starts the next row
                    break
                toks, learn = toks[:t], learn[:t]
                self.truncated += 1
                if self.truncated == 1:
                    print(f"warning: a conversation is longer than train.seq_len={t}; its tail "
                          f"is dropped (raise train.seq_len to keep it)", file=sys.stderr,
                          flush=True)
            self.stream.consume()
            inputs += toks
            targets += [toks[j + 1] if learn[j + 1] else IGNORE_INDEX
                        for j in range(len(toks) - 1)] + [IGNORE_INDEX]
            lengths.append(len(toks))
        if not inputs:
            return None
        if len(inputs) < t:
            lengths.append(t - len(inputs))
            targets += [IGNORE_INDEX] * (t - len(inputs))
            inputs += [self.pad_id] * (t - len(inputs))
        return inputs, targets, lengths
