"""Perplexity of a token stream, evaluated in windows of `context` tokens that are fed through
the generation cache in chunks, so memory stays bounded (lightning state is constant; only the
softmax layers' K/V grow). Reports the loss by position bucket: does the model use long context?"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..model.cache import HybridCache


@dataclass
class PerplexityResult:
    tokens: int
    nll: float                       # mean negative log-likelihood per predicted token (nats)
    buckets: list[tuple[int, int, float, int]] = field(default_factory=list)  # (lo, hi, nll, n)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)

    def table(self) -> str:
        rows = ["positions | tokens | nll | ppl", "---|---|---|---"]
        for lo, hi, nll, n in self.buckets:
            rows.append(f"[{lo}, {hi}) | {n} | {nll:.4f} | {math.exp(nll):.3f}")
        rows.append(f"all | {self.tokens} | {self.nll:.4f} | {self.ppl:.3f}")
        return "\n".join(rows)


def _bucket_edges(context: int, base: int = 4, first: int = 64) -> list[int]:
    edges, e = [0], first
    while e < context:
        edges.append(e)
        e *= base
    return edges + [context]


@torch.inference_mode()
def perplexity(model, token_ids: list[int] | torch.Tensor, context: int, chunk: int = 4096,
               max_windows: int | None = None, progress=None,
               bucket_base: int = 4) -> PerplexityResult:
    """Mean next-token NLL over non-overlapping windows of `context` tokens (the first token of a
    window is not predicted); buckets of positions [0, 64), [64, 64 * base), ... With `context`
    past the training length this measures extrapolation."""
    if bucket_base < 2:
        raise ValueError(f"bucket_base must be >= 2, got {bucket_base}")
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    if context < 2:
        raise ValueError(f"context must be >= 2, got {context}")
    if ids.numel() < context:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {context}")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    windows = ids.numel() // context
    if max_windows is not None:
        windows = min(windows, max_windows)
    edges = _bucket_edges(context, bucket_base)
    sums = torch.zeros(len(edges) - 1, dtype=torch.float64)
    counts = torch.zeros(len(edges) - 1, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        for w in range(windows):
            window = ids[w * context:(w + 1) * context].to(device)[None]
            cache = HybridCache(model.config, 1, context, device=device, dtype=dtype)
            nll = []
            for a in range(0, context, chunk):
                logits = model(window[:, a:a + chunk], cache=cache).logits[0]
                targets = window[0, a + 1:a + chunk + 1]
                nll.append(F.cross_entropy(logits[:targets.numel()], targets, reduction="none"))
            nll = torch.cat(nll).double().cpu()  # position p predicts token p + 1
            pos = torch.arange(1, context)
            for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
                sel = (pos >= lo) & (pos < hi)
                sums[i] += nll[sel].sum()
                counts[i] += int(sel.sum())
            if progress is not None:
                progress(1)
    finally:
        model.train(was_training)
    total = int(counts.sum())
    buckets = [(lo, hi, (sums[i] / counts[i]).item(), int(counts[i]))
               for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])) if counts[i]]
    return PerplexityResult(total, (sums.sum() / total).item(), buckets)
