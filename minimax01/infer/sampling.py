"""Token sampling, one module for `generate()` and the serving engine: per-row temperature, top-k,
top-p, logit_bias and seed, numerically safe for every value SamplingParams accepts.

How a row is sampled (logits fp32 [V]):
  1. logit_bias is added; the row's maximum m is taken. A row whose m is NaN or +inf (NaN or +inf
     somewhere) or -inf (nothing left) is *broken*: its token is BROKEN (-1) and the caller ends
     that request with an error; the other rows are sampled as if it were not there.
  2. temperature 0: the argmax. Otherwise x -> (x - m) * 1/T with 1/T clamped to fp32's normal
     range: the maximum sits at 0, so a tiny T (1e-40, 5e-324) tends to greedy instead of
     dividing into inf/NaN, and a huge T to uniform over the tokens that are not -inf.
  3. top-k (0, -1 or >= V: off), then nucleus top-p over the sorted probabilities; the most
     likely token always stays, so top_p -> 0 is greedy too.
  4. one multinomial draw: a row with its own generator (a seeded request) draws from it alone,
     exactly as `generate(..., seed=s)` does for a batch of one; the others share one call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .request import SamplingParams, TokenLogprob

BROKEN = -1
_FLOAT32_MAX = torch.finfo(torch.float32).max
_FLOAT32_TINY = torch.finfo(torch.float32).tiny


def filter_rows(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per-row top-k (<= 0 or >= V: off) then nucleus top-p (>= 1: off): logits outside are set
    to -inf. logits [B, V] float, top_k [B] long, top_p [B] float."""
    v = logits.shape[-1]
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    k = torch.where((top_k > 0) & (top_k < v), top_k, torch.full_like(top_k, v))
    kth = sorted_logits.gather(-1, (k - 1)[:, None])
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    # drop a token when the mass before it already reaches top_p; the first always stays
    drop = ((probs.cumsum(-1) - probs) >= top_p[:, None]) & (top_p[:, None] < 1.0)
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def filter_logits(logits: torch.Tensor, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """`filter_rows` with the same top-k / top-p for every row. logits: [B, V] float."""
    b, v = logits.shape
    k = torch.full((b,), min(top_k or 0, v), dtype=torch.long, device=logits.device)
    p = torch.full((b,), 1.0 if top_p is None else float(top_p), device=logits.device)
    return filter_rows(logits, k, p)


def _bias(params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """A request's logit_bias as (ids, values) CPU tensors, built once per params object."""
    bias = params.logit_bias
    cached = params.__dict__.get("_bias_tensors")
    if cached is None or cached[0] is not bias or cached[1].numel() != len(bias):
        ids = torch.tensor(list(bias.keys()), dtype=torch.long)
        vals = torch.tensor([float(x) for x in bias.values()], dtype=torch.float32)
        cached = (bias, ids, vals)
        params.__dict__["_bias_tensors"] = cached
    return cached[1], cached[2]


def apply_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """logits + each row's logit_bias (a new tensor if any row has one; else `logits`)."""
    rows = [i for i, p in enumerate(params) if p.logit_bias]
    if not rows:
        return logits
    parts = [_bias(params[i]) for i in rows]
    r = torch.cat([torch.full((ids.numel(),), i, dtype=torch.long) for i, (ids, _) in
                   zip(rows, parts)])
    c = torch.cat([ids for ids, _ in parts])
    vals = torch.cat([v for _, v in parts])
    dev = logits.device
    return logits.index_put((r.to(dev), c.to(dev)), vals.to(dev), accumulate=True)


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None],
                shared: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row: token ids [B] (long, on logits' device), BROKEN where the row's
    logits are unusable. logits [B, V]; rows with a generator draw from it alone, the rest share
    `shared` (None: torch's global generator) in one call."""
    logits = apply_logit_bias(logits.float(), params)
    top = logits.amax(-1)
    broken = ~torch.isfinite(top)
    tokens = logits.argmax(-1)
    hot = [i for i, p in enumerate(params) if p.temperature > 0]
    if hot:
        dev = logits.device
        idx = torch.tensor(hot, device=dev)
        v = logits.shape[-1]
        inv_t = torch.tensor([min(max(1.0 / params[i].temperature, _FLOAT32_TINY), _FLOAT32_MAX)
                              for i in hot], device=dev)
        x = logits[idx]
        scaled = (x - top[idx, None]) * inv_t[:, None]
        scaled = torch.where(broken[idx, None], torch.zeros_like(scaled), scaled)  # keep it finite
        if any(0 < params[i].top_k < v or params[i].top_p < 1.0 for i in hot):
            top_k = torch.tensor([min(max(params[i].top_k, 0), v) for i in hot], device=dev)
            top_p = torch.tensor([float(params[i].top_p) for i in hot], device=dev)
            scaled = filter_rows(scaled, top_k, top_p)
        probs = torch.softmax(scaled, dim=-1)
        drawn = torch.empty(len(hot), dtype=torch.long, device=dev)
        unseeded = [j for j, i in enumerate(hot) if generators[i] is None]
        if unseeded:
            sel = torch.tensor(unseeded, device=dev)
            drawn[sel] = torch.multinomial(probs[sel], 1, generator=shared)[:, 0]
        for j, i in enumerate(hot):
            if generators[i] is not None:
                drawn[j] = torch.multinomial(probs[j:j + 1], 1, generator=generators[i])[0, 0]
        tokens[idx] = drawn
    return torch.where(broken, torch.full_like(tokens, BROKEN), tokens)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None,
           logit_bias: dict[int, float] | None = None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V], every row with the same settings (generate()'s
    sampler). temperature 0 is greedy. ValueError for a bad setting, FloatingPointError when
    a row's logits are NaN/inf."""
    params = SamplingParams(max_tokens=None, temperature=temperature, top_k=top_k or 0,
                            top_p=1.0 if top_p is None else top_p, logit_bias=logit_bias)
    params.validate(logits.shape[-1])
    tokens = sample_rows(logits, [params] * logits.shape[0], [None] * logits.shape[0],
                         shared=generator)
    broken = (tokens == BROKEN).nonzero()[:, 0].tolist()
    if broken:
        raise FloatingPointError(f"sampling: the logits of row(s) {broken} are NaN or inf")
    return tokens


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, counts: list[int | None],
                   token_list: list[int] | None = None) -> list[TokenLogprob | None]:
    """Log-probs under the model's distribution (raw logits, before bias, temperature and
    filters) of each row's chosen token plus its `counts[row]` most likely alternatives (None:
    skip row). Rows whose token is BROKEN are skipped. `token_list`: tokens.tolist(), if the
    caller has it already."""
    tok_list = tokens.tolist() if token_list is None else token_list
    rows = [i for i, n in enumerate(counts) if n is not None and tok_list[i] != BROKEN]
    out: list[TokenLogprob | None] = [None] * len(counts)
    if not rows:
        return out
    sel = torch.tensor(rows, device=logits.device)
    lp = torch.log_softmax(logits[sel].float(), dim=-1)
    chosen = lp.gather(-1, tokens[sel][:, None])[:, 0].tolist()
    n_top = max(counts[i] for i in rows)
    top_v, top_i = (lp.topk(n_top, dim=-1) if n_top else (lp[:, :0], lp[:, :0].long()))
    top_v, top_i = top_v.tolist(), top_i.tolist()
    for j, i in enumerate(rows):
        n = counts[i]
        out[i] = TokenLogprob(tok_list[i], chosen[j], list(zip(top_i[j][:n], top_v[j][:n])))
    return out
