"""Tool (function) calls in MiniMax-Text-01's format, both ways.

The chat template shows the model each tool's JSON (MiniMax-Text-01's template: one
`system function_setting=functions` block per tool, after the conversation), and the model calls
one by writing

    <function_call>```typescript
    functions.get_weather({"city": "Paris"})
    ```

(`<function_call>` is a special token of its tokenizer, which decoding drops). `parse_tool_calls`
turns such blocks back into OpenAI's `tool_calls` (only for the tools the request offered, with
arguments that are a JSON object; anything else stays text); `ToolCallStream` does the same for
a stream: ordinary text goes out as it comes, text from the first possible call on is held until
the end. `format_call` writes a call in the same format, for earlier assistant turns."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

CALL_TOKEN = "<function_call>"
CALL_OPEN = "```typescript\n"
CALL_PREFIX = CALL_OPEN + "functions."
_CALL = re.compile(r"(?:<function_call>)?```typescript\n[ \t]*functions\.([A-Za-z0-9_-]{1,64})"
                   r"\((.*?)\)[ \t]*\n?```", re.DOTALL)
_MARKERS = (CALL_TOKEN, CALL_OPEN)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str   # a JSON object, as the model wrote it

    def to_openai(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function",
               "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def format_call(name: str, arguments: str, call_token: str = "") -> str:
    return f"{call_token}{CALL_PREFIX}{name}({arguments})\n```"


def parse_tool_calls(text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """(the text around the calls, stripped, or None if nothing is left; the calls)."""
    calls, pieces, pos = [], [], 0
    for m in _CALL.finditer(text):
        name, args = m.group(1), m.group(2).strip()
        if name not in names:
            continue
        try:
            value = json.loads(args)
        except ValueError:
            continue
        if not isinstance(value, dict):
            continue
        calls.append(ToolCall(f"call_{uuid.uuid4().hex[:24]}", name, args))
        pieces.append(text[pos:m.start()])
        pos = m.end()
    if not calls:
        return text, []
    pieces.append(text[pos:])
    return "".join(pieces).strip() or None, calls


class ToolCallStream:
    """Streaming: `push(text)` returns the part that is surely plain content; `finish()` parses
    what was held back. `prefix`: the start of a call already written into the prompt (a forced
    tool_choice), which the model's output continues."""

    def __init__(self, names: set[str], prefix: str = ""):
        self.names, self.prefix = names, prefix
        self.pending = prefix
        self.held = bool(prefix)

    def push(self, text: str) -> str:
        if self.held:
            self.pending += text
            return ""
        s = self.pending + text
        hits = [i for i in (s.find(m) for m in _MARKERS) if i >= 0]
        if hits:
            i = min(hits)
            self.held, self.pending = True, s[i:]
            return s[:i]
        keep = next((k for k in range(min(len(s), max(map(len, _MARKERS)) - 1), 0, -1)
                     if any(m.startswith(s[-k:]) for m in _MARKERS)), 0)
        self.pending = s[len(s) - keep:]
        return s[:len(s) - keep]

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content still to send, the calls). Without a call, a forced prefix (which the
        model did not write) is not part of the content."""
        content, calls = parse_tool_calls(self.pending, self.names)
        if not calls:
            content = self.pending[len(self.prefix):]
        self.pending = ""
        return content or "", calls
