"""MiniMaxForCausalLM: embeddings, the hybrid decoder stack, final norm and lm_head (SPEC §2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from ..ops.rope import rope_cos_sin
from ..wiring import implementation
from .layers import AttnContext, DecoderLayer, RMSNorm

IGNORE_INDEX = -100


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None        # float32 [B, T, V] (or the last `logits_to_keep` positions)
    loss: torch.Tensor | None = None   # lm loss + aux loss; None without labels
    aux_loss: torch.Tensor | None = None  # router_aux_loss_coef * mean over layers of E*sum f P
    lm_loss: torch.Tensor | None = None


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position of every packed token inside its own document: restarts at 0 at each boundary."""
    cu = cu_seqlens.to(torch.long)
    lengths = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lengths, output_size=total)
    return torch.arange(total, device=cu.device) - starts


def document_start_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[T] bool, True at the first token of every document."""
    mask = torch.zeros(total, dtype=torch.bool, device=cu_seqlens.device)
    starts = cu_seqlens[:-1].to(torch.long)
    mask[starts[starts < total]] = True
    return mask


class MiniMaxModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, input_ids, ctx: AttnContext,
                inputs_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        aux_total = h.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h, aux = torch.utils.checkpoint.checkpoint(layer, h, ctx, use_reentrant=False)
            else:
                h, aux = layer(h, ctx)
            aux_total = aux_total + aux
        return self.norm(h), aux_total / max(len(self.layers), 1)


class MiniMaxForCausalLM(nn.Module):
    """The MiniMax-01 language model. `forward` returns fp32 logits, the loss (labels given) and the
    router aux loss; packed documents via `cu_seqlens`; cached decoding via `cache`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = MiniMaxModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if not any(p.is_meta for p in self.parameters()):
            from .init import init_weights

            init_weights(self)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache=None, attention_mask: torch.Tensor | None = None, logits_to_keep: int = 0,
                shift_labels: bool = True, loss_chunk_size: int = 0,
                inputs_embeds: torch.Tensor | None = None) -> CausalLMOutput:
        """input_ids [B, T]. `labels` [B, T] follow the HF convention (the model shifts them; -100
        is ignored; with `cu_seqlens` no document predicts the next one's first token); pass
        `shift_labels=False` when labels are already next-token targets. `attention_mask` [B, T]
        (1 = token, 0 = padding) for padded batches; `logits_to_keep` > 0 returns only the last
        positions' logits, or a LongTensor of positions keeps those. `loss_chunk_size` > 0 (with
        labels) computes the lm loss over chunks of that many tokens without materialising the
        fp32 logits (long-sequence training); `logits` is then None. `inputs_embeds` [B, T, H]
        replaces the token embeddings (MiniMax-VL-01 splices image features in; input_ids still
        give the shape)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        if cu_seqlens is not None and b != 1:
            raise ValueError(f"packed input (cu_seqlens) must have batch size 1, got {b}")
        valid = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError("attention_mask must have the shape of input_ids")
            valid = attention_mask.bool()
            if cache is None and bool(valid.all()):
                valid = None
        given_positions = position_ids  # what context parallelism reads (global positions)
        if cache is not None:
            position_ids = cache.prepare(valid if valid is not None else
                                         torch.ones_like(input_ids, dtype=torch.bool), cu_seqlens)
        elif position_ids is None:
            if cu_seqlens is not None:
                position_ids = positions_from_cu_seqlens(cu_seqlens, t)[None]
            elif valid is not None:
                position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0)
            else:
                position_ids = torch.arange(t, device=input_ids.device)
        cos, sin = rope_cos_sin(position_ids, self.config.rotary_dim, self.config.rope_theta)
        ctx = AttnContext(cu_seqlens=cu_seqlens, cos=cos, sin=sin, valid=valid, cache=cache,
                          position_ids=given_positions)
        want = (b, t, self.config.hidden_size)
        if inputs_embeds is not None and tuple(inputs_embeds.shape) != want:
            raise ValueError(f"inputs_embeds must be [B, T, hidden] = {list(want)}, got "
                             f"{list(inputs_embeds.shape)}")
        h, aux = self.model(input_ids, ctx, inputs_embeds)
        if cache is not None:
            cache.commit()
        aux_loss = aux * self.config.router_aux_loss_coef
        if labels is not None and loss_chunk_size:
            from ..ops.loss import chunked_cross_entropy

            targets = self.lm_targets(labels, cu_seqlens, shift_labels).reshape(-1)
            total, count = chunked_cross_entropy(h.reshape(-1, h.shape[-1]), self.lm_head.weight,
                                                 targets, loss_chunk_size)
            lm_loss = total / count  # NaN without targets, like F.cross_entropy's mean
            return CausalLMOutput(logits=None, loss=lm_loss + aux_loss, aux_loss=aux_loss,
                                  lm_loss=lm_loss)
        if isinstance(logits_to_keep, torch.Tensor):  # positions to keep (e.g. packed docs' ends)
            h = h[:, logits_to_keep]
        elif logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h).float()
        if labels is None:
            return CausalLMOutput(logits=logits, aux_loss=aux_loss)
        lm_loss = self.lm_loss(logits, labels, cu_seqlens, shift_labels)
        return CausalLMOutput(logits=logits, loss=lm_loss + aux_loss, aux_loss=aux_loss,
                              lm_loss=lm_loss)

    @staticmethod
    def lm_targets(labels, cu_seqlens=None, shift_labels=True):
        """Next-token targets [B, T] from HF-style labels (-100 where nothing is predicted)."""
        if not shift_labels:
            return labels
        targets = labels[:, 1:]
        if cu_seqlens is not None:
            starts = document_start_mask(cu_seqlens, labels.shape[1])[1:]
            targets = targets.masked_fill(starts[None], IGNORE_INDEX)
        return F.pad(targets, (0, 1), value=IGNORE_INDEX)

    @staticmethod
    def lm_loss(logits, labels, cu_seqlens=None, shift_labels=True, reduction="mean"):
        """Cross entropy over non-ignored targets (mean, or per-token with reduction='none')."""
        targets = MiniMaxForCausalLM.lm_targets(labels, cu_seqlens, shift_labels)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction=reduction)

    # ------------------------------------------------------------------ conveniences
    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.model.gradient_checkpointing = enabled

    def moe_stats(self):
        """Per-layer routing statistics of the last forward (list of MoEStats or None)."""
        return [layer.mlp.last_stats for layer in self.model.layers]

    def save_pretrained(self, path, dialect: str = "legacy", max_shard_size: str | int = "2GB",
                        tokenizer=None):
        """config.json + sharded safetensors in `dialect`, and the tokenizer's files if given
        (a quantised model writes the pre-quantised layout, docs/quantization.md;
        minimax01.checkpoint.pretrained, reached through minimax01.wiring)."""
        implementation("pretrained").save_pretrained(self, path, dialect=dialect,
                                                     max_shard_size=max_shard_size,
                                                     tokenizer=tokenizer)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, quantization=None,
                        **options) -> "MiniMaxForCausalLM":
        """An HF-format checkpoint folder, either dialect. quantization: None (as stored),
        "int8" | "fp8" (quantise 16-bit checkpoints while loading), "none" (16-bit only)
        (minimax01.checkpoint.pretrained, reached through minimax01.wiring)."""
        return implementation("pretrained").load_pretrained(cls, path, dtype=dtype, device=device,
                                                            quantization=quantization, **options)

    @classmethod
    def from_config_on_meta(cls, config: ModelConfig) -> "MiniMaxForCausalLM":
        """Build without allocating (the 456B model fits on the meta device)."""
        with torch.device("meta"):
            return cls(config)
