"""generate(): a readable prefill-then-decode loop over the hybrid cache."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..model.cache import HybridCache
from .request import SamplingParams
from .sampling import sample


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device=None):
    """List of token lists -> (input_ids [B, T], attention_mask [B, T]) padded on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def generate(model, input_ids, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop_tokens: Sequence[int] | None = None, attention_mask: torch.Tensor | None = None,
             pad_token_id: int | None = None, logit_bias: dict[int, float] | None = None,
             on_token: Callable[[torch.Tensor], bool | None] | None = None,
             prefill_chunk: int | None = None, pixel_values=None,
             image_sizes=None) -> torch.Tensor:
    """Continue each prompt by up to `max_new_tokens` tokens.

    `input_ids`: [B, T] tensor (left-padded, with `attention_mask`) or a list of token lists.
    Returns [B, T + n] (n <= max_new_tokens: the loop ends once every row has hit a stop token);
    after its stop token a row is filled with the pad id. Sampling is `sampling.sample` (the
    engine's sampler). `on_token(tokens [B])` is called after every step (to stream the text);
    when it returns True the loop ends there. `prefill_chunk`: the prompt goes through the cache
    this many tokens per forward (the same result; a 128K-token prompt then never builds a
    128K x 128K attention mask); default: all at once. `pixel_values` / `image_sizes` (a
    MiniMax-VL-01 model): the images of the prompts, in order; only the prefill sees them."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    SamplingParams(max_tokens=None, temperature=temperature, top_k=top_k or 0,
                   top_p=1.0 if top_p is None else top_p, seed=seed,
                   logit_bias=logit_bias).validate(model.config.vocab_size)  # before any work
    if pixel_values is not None and not hasattr(model, "embed"):
        raise ValueError("pixel_values given, but this model takes no images")
    cfg = getattr(model.config, "text_config", model.config)  # VL: the language model's
    pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id or cfg.eos_token_id or 0)
    device = next(model.parameters()).device
    if not isinstance(input_ids, torch.Tensor):
        input_ids, attention_mask = left_pad(input_ids, pad, device)
    input_ids = input_ids.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    b, t = input_ids.shape
    if max_new_tokens == 0:
        return input_ids
    stops = torch.tensor(sorted(set(stop_tokens or [])), dtype=torch.long, device=device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    dtype = next(model.parameters()).dtype
    cache = HybridCache(cfg, b, t + max_new_tokens, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        chunk = prefill_chunk or t
        embeds = None
        if pixel_values is not None:  # the image features, spliced in once for all chunks
            embeds = model.embed(input_ids, pixel_values, image_sizes)
        for a in range(0, t, chunk):
            extra = {} if embeds is None else {"inputs_embeds": embeds[:, a:a + chunk]}
            logits = model(input_ids[:, a:a + chunk], attention_mask=attention_mask[:, a:a + chunk],
                           cache=cache, logits_to_keep=1, **extra).logits
        out = [input_ids]
        done = torch.zeros(b, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            token = sample(logits[:, -1], temperature, top_k, top_p, generator, logit_bias)
            token = torch.where(done, torch.full_like(token, pad), token)
            out.append(token[:, None])
            if stops.numel():
                done |= torch.isin(token, stops)
            if on_token is not None and on_token(token):
                break
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            logits = model(token[:, None], cache=cache).logits
    finally:
        model.train(was_training)
    return torch.cat(out, 1)
