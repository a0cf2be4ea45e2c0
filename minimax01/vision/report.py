"""What `info` shows for MiniMax-VL-01 besides the language model's own tables: parameters and
weight memory of each part, and image tokens, tiles, vision-tower FLOPs and LM cache memory per
image resolution (VL01.md §5)."""

from __future__ import annotations

from ..accounting import Table, fmt_bytes, fmt_count, fmt_flops, sequence_bytes
from .anyres import AnyRes
from .config import VLConfig

RESOLUTIONS = ((336, 336), (480, 640), (768, 1024), (720, 1280), (1080, 1920), (2000, 1000),
               (2048, 2048), (3000, 4000), (4000, 4000))  # (height, width)


def parts_table(cfg: VLConfig) -> Table:
    parts = cfg.num_parameters()
    total = sum(parts.values())
    active = total - parts["language_model"] + cfg.text_config.num_parameters(active=True)
    rows = [[name, fmt_count(n), fmt_bytes(2 * n)] for name, n in parts.items()]
    rows += [["total", fmt_count(total), fmt_bytes(2 * total)],
             ["active per token", fmt_count(active), ""]]
    v = cfg.vision_config
    return Table("MiniMax-VL-01 parts", ["part", "parameters", "bf16 weights"], rows,
                 [f"vision tower: ViT {v.num_hidden_layers} layers x {v.hidden_size} "
                  f"({v.num_attention_heads} heads, MLP {v.intermediate_size}), "
                  f"{v.image_size} px tiles of {v.patch_size} px patches, no post-LN",
                  "projector: Linear -> GELU -> Linear; image_newline: one vector per feature row"])


def tile_flops(cfg: VLConfig) -> float:
    """Forward FLOPs of one tile through the tower and the projector (matmuls only)."""
    v, t = cfg.vision_config, cfg.text_config.hidden_size
    n, h = v.tokens_per_tile + 1, v.hidden_size
    block = 2 * n * (4 * h * h + 2 * h * v.intermediate_size) + 4 * n * n * h
    patch = 2 * v.tokens_per_tile * v.num_channels * v.patch_size ** 2 * h
    projector = 2 * v.tokens_per_tile * (h * t + t * t)
    return v.num_hidden_layers * block + patch + projector


def image_tokens_table(cfg: VLConfig, resolutions=RESOLUTIONS) -> Table:
    geo = AnyRes.of(cfg)
    rows = []
    for h, w in resolutions:
        rows_, cols = geo.grid(h, w)
        tokens = geo.num_image_tokens(h, w)
        tiles = geo.num_tiles(h, w)
        rows.append([f"{w}x{h}", f"{cols}x{rows_}", str(tiles), f"{tokens:,}",
                     fmt_flops(tiles * tile_flops(cfg)),
                     fmt_bytes(sequence_bytes(cfg.text_config, tokens)
                               - cfg.text_config.lightning_state_bytes())])
    return Table("Image tokens per resolution",
                 ["image (WxH)", "grid (WxH tiles)", "ViT tiles", "tokens", "vision forward",
                  "KV cache (bf16)"], rows,
                 ["tiles = the thumbnail + the grid; tokens = thumbnail + unpadded grid rows, each "
                  "with a newline"])


def vl_report(cfg: VLConfig) -> list[Table]:
    return [parts_table(cfg), image_tokens_table(cfg)]
