"""What a request asks of the engine (SamplingParams) and what it gets back (StepOutput,
Completion). Validation lives here so the engine and the server reject bad values alike."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    """temperature 0 is greedy. top_k 0 / top_p 1.0 switch those filters off. `seed` gives the
    request its own random stream (same seed, same prompt -> same output, whatever else runs).
    Generation ends at a stop token (the tokenizer's eos unless `ignore_eos`, plus
    `stop_token_ids`), at a stop string (cut from the text), or after `max_tokens`
    (None: as many as the context allows). `logprobs` n: return the chosen token's log-prob and
    the n most likely alternatives (0: the chosen one only; None: nothing)."""

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        """Raise ValueError naming the first bad field; returns self."""
        def bad(name, why):
            raise ValueError(f"{name}: {why} (got {getattr(self, name)!r})")

        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            bad("max_tokens", "must be a positive integer")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) \
                or not 0 <= self.temperature < float("inf"):
            bad("temperature", "must be a finite number >= 0")
        if not is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0 (0 = off)")
        if not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool) \
                or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if self.seed is not None and not is_int(self.seed):
            bad("seed", "must be an integer")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "must be a list of non-empty strings")
        if not all(is_int(t) and t >= 0 and (vocab_size is None or t < vocab_size)
                   for t in self.stop_token_ids):
            bad("stop_token_ids", f"must be token ids below the vocabulary size {vocab_size}")
        if self.logprobs is not None and (not is_int(self.logprobs)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}]")
        return self


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, log-prob), most likely first


@dataclass
class StepOutput:
    """What one engine step produced for one request (a streaming delta)."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None
    finished: bool = False
    finish_reason: str | None = None   # "stop", "length", "abort", "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Completion:
    """A finished request, as `Engine.generate` returns it."""

    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
