"""MiniMaxVLForConditionalGeneration: MiniMax-VL-01 (VL01.md §1, §6) — the vision tower, the
projector, `image_newline`, and the unchanged MiniMaxForCausalLM as `language_model`; module
names are the released checkpoint's.

`input_ids` already hold each image's `<image>` token repeated as many times as the image has
feature tokens (ImageProcessor.num_image_tokens; vision/chat.py expands a prompt). The images'
packed features, in order (row by row over the batch, left to right), replace the embeddings at
those positions. Only a forward that is given `pixel_values` computes image features: with a
cache, that is the prefill; decoding is pure text."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ..model import MiniMaxForCausalLM
from ..model.model import CausalLMOutput
from ..wiring import implementation
from .anyres import AnyRes
from .config import VLConfig
from .tower import Projector, VisionTower


class MiniMaxVLForConditionalGeneration(nn.Module):
    def __init__(self, config: VLConfig):
        super().__init__()
        self.config = config
        text, vision = config.text_config, config.vision_config
        self.vision_tower = VisionTower(vision)
        self.multi_modal_projector = Projector(vision.hidden_size, text.hidden_size)
        self.image_newline = nn.Parameter(torch.empty(text.hidden_size))
        self.language_model = MiniMaxForCausalLM(text)
        self.anyres = AnyRes.of(config)
        if not self.image_newline.is_meta:
            nn.init.normal_(self.image_newline, std=text.hidden_size ** -0.5)  # as LLaVA-NeXT

    # ------------------------------------------------------------------ images
    def image_features(self, pixel_values: Sequence[torch.Tensor],
                       image_sizes: Sequence[Sequence[int]],
                       tile_batch: int | None = None) -> list[torch.Tensor]:
        """One packed [num_image_tokens, text hidden] tensor per image. All images' tiles go
        through the tower together (`tile_batch` at a time); projection is per ViT token."""
        if len(pixel_values) != len(image_sizes):
            raise ValueError(f"got {len(pixel_values)} pixel_values tensors but "
                             f"{len(image_sizes)} image_sizes")
        if not len(pixel_values):
            return []
        sizes = [(int(h), int(w)) for h, w in image_sizes]
        for i, (px, (h, w)) in enumerate(zip(pixel_values, sizes)):
            want = self.anyres.num_tiles(h, w)
            if px.dim() != 4 or px.shape[0] != want:
                raise ValueError(f"image {i} ({h}x{w}, HxW) needs pixel_values [{want}, 3, S, S] "
                                 f"(thumbnail + grid tiles), got {list(px.shape)}")
        device = self.image_newline.device
        tiles = torch.cat([px.to(device) for px in pixel_values])
        feats = self.multi_modal_projector(self.vision_tower(tiles, tile_batch=tile_batch))
        out, start = [], 0
        for px, (h, w) in zip(pixel_values, sizes):
            n = px.shape[0]
            out.append(self.anyres.pack(feats[start:start + n], h, w, self.image_newline))
            start += n
        return out

    def embed(self, input_ids: torch.Tensor, pixel_values=None, image_sizes=None,
              tile_batch: int | None = None) -> torch.Tensor:
        """[B, T, hidden]: the token embeddings with the image features at the `<image>` tokens.
        The number of `<image>` tokens must equal the images' feature tokens."""
        token = self.config.image_token_index
        is_image = input_ids == token
        embed = self.language_model.model.embed_tokens
        h = embed(input_ids.masked_fill(is_image, 0))
        have = int(is_image.sum())
        feats = self.image_features(pixel_values or [], image_sizes or [], tile_batch)
        need = sum(f.shape[0] for f in feats)
        if have != need:
            sizes = [tuple(int(x) for x in s) for s in (image_sizes or [])]
            raise ValueError(f"input_ids hold {have} image token(s) ({token}) but the "
                             f"{len(feats)} image(s) {sizes} give {need} feature token(s); "
                             f"expand each <image> with ImageProcessor.num_image_tokens")
        if feats:
            h = h.masked_scatter(is_image[..., None], torch.cat(feats).to(h.dtype))
        return h

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, pixel_values: Sequence[torch.Tensor] | None = None,
                image_sizes: Sequence[Sequence[int]] | None = None,
                labels: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                tile_batch: int | None = None, **lm_options) -> CausalLMOutput:
        """Logits (fp32 [B, T, V]) and, with `labels`, the loss: the language model's forward
        (`attention_mask`, `cache`, `logits_to_keep`, `cu_seqlens`, ... pass through) on the
        embeddings with images spliced in. `pixel_values`: one [tiles, 3, S, S] tensor per image
        (thumbnail first); `image_sizes`: their original (height, width). `inputs_embeds` (from
        `embed`) skips the embedding step, for a prompt fed in chunks."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, image_sizes, tile_batch)
        elif pixel_values:
            raise ValueError("give pixel_values or inputs_embeds, not both")
        return self.language_model(input_ids, labels=labels, inputs_embeds=inputs_embeds,
                                   **lm_options)

    # ------------------------------------------------------------------ conveniences
    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.language_model.set_gradient_checkpointing(enabled)
        self.vision_tower.gradient_checkpointing = enabled

    def save_pretrained(self, path, dialect: str = "legacy", max_shard_size: str | int = "2GB",
                        tokenizer=None):
        """config.json + safetensors in the released layout (minimax01.checkpoint.vl)."""
        return implementation("vl_pretrained").save_vl(self, path, dialect=dialect,
                                                        max_shard_size=max_shard_size,
                                                        tokenizer=tokenizer)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None) -> "MiniMaxVLForConditionalGeneration":
        """A checkpoint folder in the released layout, one file or sharded with an index."""
        return implementation("vl_pretrained").load_vl(cls, path, dtype=dtype, device=device)

    @classmethod
    def from_config_on_meta(cls, config: VLConfig) -> "MiniMaxVLForConditionalGeneration":
        with torch.device("meta"):
            return cls(config)
