"""What a request asks of the engine (SamplingParams) and what it gets back (StepOutput,
Completion). Validation lives here so the engine and the server reject bad values alike, and its
errors are data (EngineError.code, .param): the server maps codes to HTTP statuses and never
reads message text."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20
MAX_STOP = 4              # stop strings per request (OpenAI: "up to 4 sequences")
MAX_STOP_CHARS = 1024     # per stop string: a longer one only delays every text release
MAX_LOGIT_BIAS = 100.0    # |bias| (OpenAI: -100 to 100)
INT64 = (-2 ** 63, 2 ** 63 - 1)


class EngineError(Exception):
    """An error with a machine-readable `code` and, when a request field is at fault, `param`.

    Codes: "invalid_value" (a field's value), "context_length_exceeded", "engine_unavailable"
    (not running or shutting down), "server_shutdown", "nonfinite_logits", "generation_failed"."""

    def __init__(self, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


class RequestError(EngineError, ValueError):
    """The request itself is bad (a client error); a ValueError for plain Python callers."""

    def __init__(self, message: str, code: str = "invalid_value", param: str | None = None):
        super().__init__(message, code, param)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class SamplingParams:
    """temperature 0 is greedy. top_k 0 (or -1) / top_p 1.0 switch those filters off; a top_k
    at or above the vocabulary size is off too. `seed` gives the request its own random stream
    (same seed, same prompt -> same output, whatever else runs). `logit_bias` {token id: bias in
    [-100, 100]} is added to the logits before sampling (greedy included). Generation ends at a
    stop token (the tokenizer's eos unless `ignore_eos`, plus `stop_token_ids`), at a stop string
    (cut from the text), or after `max_tokens` (None: as many as the context allows).
    `logprobs` n: return the chosen token's log-prob and the n most likely alternatives (0: the
    chosen one only; None: nothing); they are those of the raw logits."""

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    logit_bias: dict[int, float] | None = None

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        """Raise RequestError (a ValueError) naming the first bad field; returns self."""
        def bad(name, why):
            raise RequestError(f"{name}: {why} (got {_short(getattr(self, name))})", param=name)

        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            bad("max_tokens", "must be a positive integer")
        if not _is_real(self.temperature) or self.temperature < 0:
            bad("temperature", "must be a finite number >= 0")
        if not _is_int(self.top_k) or not -1 <= self.top_k <= INT64[1]:
            bad("top_k", "must be an integer in [-1, 2^63-1] (0 or -1 = off)")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if self.seed is not None and not (_is_int(self.seed)
                                          and INT64[0] <= self.seed <= INT64[1]):
            bad("seed", "must be an integer in [-2^63, 2^63-1]")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or len(self.stop) > MAX_STOP or not all(
                isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in self.stop):
            bad("stop", f"must be at most {MAX_STOP} non-empty strings of at most "
                        f"{MAX_STOP_CHARS} characters")
        if not all(_is_int(t) and t >= 0 and (vocab_size is None or t < vocab_size)
                   for t in self.stop_token_ids):
            bad("stop_token_ids", f"must be token ids below the vocabulary size {vocab_size}")
        if self.logprobs is not None and (not _is_int(self.logprobs)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}]")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                bad("logit_bias", "must be a mapping {token id: bias}")
            for t, b in self.logit_bias.items():
                if not _is_int(t) or t < 0 or (vocab_size is not None and t >= vocab_size):
                    bad("logit_bias", f"token id {_short(t)} is outside the vocabulary "
                                      f"[0, {vocab_size})")
                if not _is_real(b) or abs(b) > MAX_LOGIT_BIAS:
                    bad("logit_bias", f"the bias of token {t} must be a number in "
                                      f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
        return self


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, log-prob), most likely first
    text_offset: int = 0          # where the token's text starts in the completion's text


@dataclass
class StepOutput:
    """What one engine step produced for one request (a streaming delta). `completion_tokens`
    counts the tokens whose text is returned (not those of a matched stop string); `cached_tokens`
    the prompt tokens the prefix cache served (OpenAI's usage.prompt_tokens_details). A request
    that failed ends with finish_reason "error", `error` (a message) and `error_code`."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None
    finished: bool = False
    finish_reason: str | None = None   # "stop", "length", "abort", "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    error_code: str | None = None
    cached_tokens: int = 0             # prompt tokens served from the prefix cache


@dataclass
class Completion:
    """A finished request, as `Engine.generate` returns it. `token_ids` are all the tokens the
    model generated (a matched stop string's included; `text` has it cut off)."""

    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None
