"""Sampling for a batch whose rows have their own parameters (temperature, top-k, top-p, seed),
with the semantics of `sampling.sample` row by row: a seeded row draws from its own generator
exactly as `generate(..., seed=s)` does for a batch of one."""

from __future__ import annotations

import torch

from .request import SamplingParams, TokenLogprob


def filter_rows(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per-row top-k (0 = off) then nucleus top-p (1 = off), like `sampling.filter_logits`."""
    v = logits.shape[-1]
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    k = torch.where((top_k > 0) & (top_k < v), top_k, torch.full_like(top_k, v))
    kth = sorted_logits.gather(-1, (k - 1)[:, None])
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    drop = ((probs.cumsum(-1) - probs) >= top_p[:, None]) & (top_p[:, None] < 1.0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None],
                shared: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row. logits [B, V] fp32; rows with a generator draw from it alone, the rest
    share `shared` in one call. Returns token ids [B] (long, on logits' device)."""
    logits = logits.float()
    tokens = logits.argmax(-1)
    hot = [i for i, p in enumerate(params) if p.temperature > 0]
    if not hot:
        return tokens
    dev = logits.device
    idx = torch.tensor(hot, device=dev)
    temp = torch.tensor([float(params[i].temperature) for i in hot], device=dev)
    top_k = torch.tensor([params[i].top_k for i in hot], device=dev, dtype=torch.long)
    top_p = torch.tensor([float(params[i].top_p) for i in hot], device=dev)
    scaled = logits[idx] / temp[:, None]
    if any(params[i].top_k or params[i].top_p < 1.0 for i in hot):
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
    return tokens


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, counts: list[int | None]
                   ) -> list[TokenLogprob | None]:
    """Log-probs under the model's distribution (raw logits, before temperature and filters) of
    each row's chosen token plus its `counts[row]` most likely alternatives (None: skip row)."""
    rows = [i for i, n in enumerate(counts) if n is not None]
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
        out[i] = TokenLogprob(int(tokens[i]), chosen[j], list(zip(top_i[j][:n], top_v[j][:n])))
    return out
