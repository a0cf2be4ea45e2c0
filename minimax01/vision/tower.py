"""The vision tower of MiniMax-VL-01 (VL01.md §2-3): a CLIP ViT-L/14 @ 336 with exact GELU, a
pre-LN (`pre_layrnorm`, sic) on the embeddings, pre-LN blocks, and no post-LN; and the two-layer
MLP projector into the language model's width. Module names are the released checkpoint's
(`vision_tower.vision_model.*`, `multi_modal_projector.linear_1/linear_2`).

Features are the last block's output with the CLS token dropped: [tiles, 576, 1024] for 336 px
tiles. Tiles are independent 577-token sequences; the released code packs them into one varlen
sequence with attention restricted per tile, which is the same computation."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import VisionConfig


class VisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        h = config.hidden_size
        self.class_embedding = nn.Parameter(torch.empty(h))
        self.patch_embedding = nn.Conv2d(config.num_channels, h, config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(config.tokens_per_tile + 1, h)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> [N, 1 + (S/p)^2, hidden]: CLS first, then the patches in raster order."""
        w = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(w.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], 1) + self.position_embedding.weight.to(patches.dtype)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q_proj, self.k_proj = nn.Linear(h, h), nn.Linear(h, h)
        self.v_proj, self.out_proj = nn.Linear(h, h), nn.Linear(h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, h = x.shape

        def heads(y):
            return y.view(n, t, self.num_heads, h // self.num_heads).transpose(1, 2)

        o = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)),
                                           heads(self.v_proj(x)))  # bidirectional, 1/sqrt(d)
        return self.out_proj(o.transpose(1, 2).reshape(n, t, h))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact erf GELU, not CLIP's quick_gelu


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        eps = config.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionBlock(config) for _ in range(config.num_hidden_layers))


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = VisionEncoder(config)


class VisionTower(nn.Module):
    """`VisionTower(config)(pixel_values [N, 3, S, S])` -> features [N, (S/p)^2, hidden]: the
    last block's output, CLS dropped, no post-LN (VL01.md §3). `tile_batch` bounds how many
    tiles go through at once (activation memory); the result does not depend on it."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = VisionTransformer(config)
        self.gradient_checkpointing = False
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Fresh weights (VL training starts the tower from a pre-trained CLIP; tests from here)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.vision_model.embeddings.class_embedding, std=std)

    def forward(self, pixel_values: torch.Tensor, tile_batch: int | None = None) -> torch.Tensor:
        s, c = self.config.image_size, self.config.num_channels
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (c, s, s):
            raise ValueError(f"pixel_values must be [tiles, {c}, {s}, {s}], got "
                             f"{list(pixel_values.shape)}")
        if tile_batch is not None and pixel_values.shape[0] > tile_batch:
            return torch.cat([self(x) for x in pixel_values.split(tile_batch)])
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixel_values))
        for block in vm.encoder.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x[:, 1:]


class Projector(nn.Module):
    """`multi_modal_projector`: Linear -> exact GELU -> Linear, applied per ViT token."""

    def __init__(self, vision_hidden: int, text_hidden: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden, text_hidden)
        self.linear_2 = nn.Linear(text_hidden, text_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))
