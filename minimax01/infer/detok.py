"""Incremental detokenization with stop strings, for streaming.

Text is released only once it is final: not while the last tokens decode to an incomplete
character (U+FFFD at the end), and not while its tail could still grow into a stop string. A stop
string ends the request and is cut from the text, like OpenAI's API; the tokens that made only
the cut text are not counted as returned (`returned_tokens`). `starts[i]` is where token i's text
begins in `text` (the `text_offset` of OpenAI's log-probs)."""

from __future__ import annotations

from bisect import bisect_left


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tok = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.starts: list[int] = []
        self._prefix = 0   # ids[_prefix:_read] decode to text already in self.text's source
        self._read = 0
        self.text = ""     # decoded text so far (cut at a stop string once one is found)
        self.sent = 0      # characters of self.text already released
        self.stopped = False

    @property
    def returned_tokens(self) -> int:
        """Tokens whose text (some of it) is in the output: all, or those before a stop."""
        return bisect_left(self.starts, len(self.text)) if self.stopped else len(self.ids)

    def push(self, token_id: int) -> str:
        """Add one token; returns the newly final text (maybe empty). Sets `stopped` when a stop
        string appears."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        self.starts.append(len(self.text))
        before = self.tok.decode(self.ids[self._prefix:self._read])
        after = self.tok.decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            new = after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
            start = max(0, len(self.text) - self.hold)
            self.text += new
            cut = self._find_stop(start)
            if cut is not None:
                self.text = self.text[:cut]
                self.stopped = True
                return self._release(len(self.text))
        return self._release(self._safe_end())

    def finish(self) -> str:
        """The request ended: release what is held back (incomplete characters included)."""
        if not self.stopped:
            tail = self.tok.decode(self.ids[self._prefix:])
            done = self.tok.decode(self.ids[self._prefix:self._read])
            if len(tail) > len(done):
                start = max(0, len(self.text) - self.hold)
                self.text += tail[len(done):]
                cut = self._find_stop(start)
                if cut is not None:
                    self.text = self.text[:cut]
                    self.stopped = True
                self._prefix = self._read = len(self.ids)
        return self._release(len(self.text))

    def _safe_end(self) -> int:
        """End of the text that no stop string can still claim: hold back from the first place
        where the rest of the text is the start of a stop string (cost: the occurrences of each
        stop string's first character in its last len-1 characters, not len^2)."""
        n, end = len(self.text), len(self.text)
        for s in self.stop:
            i = self.text.find(s[0], max(self.sent, n - len(s) + 1))
            while i != -1 and i < end:
                if s.startswith(self.text[i:]):
                    end = i
                    break
                i = self.text.find(s[0], i + 1)
        return end

    def _find_stop(self, start: int) -> int | None:
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _release(self, end: int) -> str:
        end = max(end, self.sent)
        out = self.text[self.sent:end]
        self.sent = end
        return out
