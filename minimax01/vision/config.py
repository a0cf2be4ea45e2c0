"""Configuration of MiniMax-VL-01 (VL01.md §1-2): `VisionConfig` (the CLIP ViT tower),
`VLConfig` (tower + projector + the MiniMax text model), the VL presets, and the translation to
and from the released `config.json` (`model_type` "minimax_vl_01", nested `text_config` and
`vision_config`). The released values are the defaults; the class defaults of the released
remote code (LLaVA leftovers) are not."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..config import ModelConfig
from ..hf_config import config_dtype, read_float, read_int

VL_MODEL_TYPE = "minimax_vl_01"
IMAGE_TOKEN_INDEX = 200025        # `<image>` in the VL-01 tokenizer
END_OF_SENTENCE = 200020          # generation stops here [main]
MAX_TILES = 18                    # grid tiles of the largest pinpoint; the thumbnail comes on top


def grid_pinpoints(tile: int = 336) -> list[list[int]]:
    """The 28 released grid resolutions, [height, width] in pixels: a x b tiles of `tile` pixels
    with a, b in 1..6 and at most 18 tiles (VL01.md §4 lists the 8 pairs this leaves out)."""
    return [[a * tile, b * tile] for a in range(1, 7) for b in range(1, 7) if a * b <= MAX_TILES]


@dataclass
class VisionConfig:
    """The ViT-L/14 @ 336 tower (VL01.md §2): exact-erf GELU, pre-LN blocks, no post-LN."""

    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "hidden_size", "intermediate_size",
                     "num_hidden_layers", "num_attention_heads", "num_channels"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"vision_config.{name} must be a positive integer, got {v!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision_config.image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"vision_config.hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act != "gelu":
            raise ValueError(f"vision_config.hidden_act {self.hidden_act!r} is not supported; "
                             f"MiniMax-VL-01 uses 'gelu' (exact erf GELU)")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """Feature tokens of one tile: the CLS token is dropped."""
        return self.patches_per_side ** 2

    def num_parameters(self) -> int:
        h, i, p = self.hidden_size, self.intermediate_size, self.patch_size
        embed = self.num_channels * p * p * h + h + (self.tokens_per_tile + 1) * h
        block = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 4 * h
        return embed + 2 * h + self.num_hidden_layers * block

    def to_hf_config(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(model_type="clip_vision_model", position_embedding_type="learned_absolute")
        return d

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "VisionConfig":
        if not isinstance(cfg, dict):
            raise ValueError("config.json: vision_config must be an object")
        pos = cfg.get("position_embedding_type", "learned_absolute")
        if pos != "learned_absolute":
            raise ValueError(f"config.json: vision_config.position_embedding_type {pos!r} is not "
                             f"supported (only 'learned_absolute', as released)")
        out: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in cfg:
                v = cfg[f.name]
                key = f"vision_config.{f.name}"
                out[f.name] = (read_float(v, key) if f.type == "float" else
                               v if f.type == "str" else read_int(v, key))
        return cls(**out)


@dataclass
class VLConfig:
    """MiniMax-VL-01: `text_config` (a ModelConfig, the unchanged language model), `vision_config`,
    the `<image>` token id and the any-res grid pinpoints ([height, width] pairs; the released list
    is transpose-symmetric, so either reading gives the same set)."""

    text_config: ModelConfig = field(default_factory=ModelConfig)
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    image_token_index: int = IMAGE_TOKEN_INDEX
    image_grid_pinpoints: list[list[int]] | None = None
    projector_hidden_act: str = "gelu"
    vision_feature_layer: int = -1
    vision_feature_select_strategy: str = "default"

    def __post_init__(self) -> None:
        tile = self.vision_config.image_size
        if self.image_grid_pinpoints is None:
            self.image_grid_pinpoints = grid_pinpoints(tile)
        pins = self.image_grid_pinpoints
        if (not isinstance(pins, list) or not pins or not all(
                isinstance(p, (list, tuple)) and len(p) == 2 and all(
                    isinstance(x, int) and not isinstance(x, bool) and x > 0 and x % tile == 0
                    for x in p) for p in pins)):
            raise ValueError(f"image_grid_pinpoints must be a non-empty list of [height, width] "
                             f"pairs of positive multiples of the tile size {tile}")
        self.image_grid_pinpoints = [list(p) for p in pins]
        if not 0 <= self.image_token_index < self.text_config.vocab_size:
            raise ValueError(f"image_token_index {self.image_token_index} is outside the "
                             f"vocabulary (vocab_size {self.text_config.vocab_size})")
        if self.projector_hidden_act != "gelu":
            raise ValueError(f"projector_hidden_act {self.projector_hidden_act!r} is not supported "
                             f"(MiniMax-VL-01 uses 'gelu')")
        if self.vision_feature_layer != -1:
            raise ValueError(f"vision_feature_layer {self.vision_feature_layer} is not supported: "
                             f"the released model reads the last layer (-1)")
        if self.vision_feature_select_strategy != "default":
            raise ValueError(f"vision_feature_select_strategy "
                             f"{self.vision_feature_select_strategy!r} is not supported (only "
                             f"'default': CLS dropped)")
        if self.text_config.tie_word_embeddings:
            raise ValueError("text_config.tie_word_embeddings is not supported for MiniMax-VL-01 "
                             "(the released layout stores language_model.lm_head.weight)")

    # the few fields callers of a language model read (generate(), the cache) come from the LM
    @property
    def dtype(self) -> str:
        return self.text_config.dtype

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    def replace(self, **changes: Any) -> "VLConfig":
        """`dtype=` changes the text model's dtype; other keys are VLConfig fields."""
        text = self.text_config
        if "dtype" in changes:
            text = text.replace(dtype=changes.pop("dtype"))
        return dataclasses.replace(self, text_config=text, **changes)

    def num_parameters(self) -> dict[str, int]:
        """Parameters of each part (the projector with its biases, the newline vector)."""
        v, t = self.vision_config.hidden_size, self.text_config.hidden_size
        return {"vision_tower": self.vision_config.num_parameters(),
                "multi_modal_projector": v * t + t + t * t + t,
                "image_newline": t,
                "language_model": self.text_config.num_parameters()}

    # ------------------------------------------------------------------ config.json
    def to_hf_config(self, dialect: str = "legacy") -> dict[str, Any]:
        text = self.text_config.to_hf_config(dialect)
        return {"architectures": ["MiniMaxVL01ForConditionalGeneration"],
                "model_type": VL_MODEL_TYPE,
                "image_token_index": self.image_token_index,
                "image_grid_pinpoints": self.image_grid_pinpoints,
                "projector_hidden_act": self.projector_hidden_act,
                "vision_feature_layer": self.vision_feature_layer,
                "vision_feature_select_strategy": self.vision_feature_select_strategy,
                "image_seq_length": self.vision_config.tokens_per_tile,
                "ignore_index": -100,
                "tie_word_embeddings": False,
                "torch_dtype": self.text_config.dtype,
                "text_config": text,
                "vision_config": self.vision_config.to_hf_config()}

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "VLConfig":
        """The released (or our) VL config.json dict. The top-level dtype, when the text config
        states none, is the model's."""
        if not isinstance(cfg, dict):
            raise ValueError("config.json must be a JSON object")
        if cfg.get("model_type") != VL_MODEL_TYPE:
            raise ValueError(f"config.json: model_type is {cfg.get('model_type')!r}, expected "
                             f"{VL_MODEL_TYPE!r} (MiniMax-VL-01)")
        for key in ("text_config", "vision_config"):
            if not isinstance(cfg.get(key), dict):
                raise ValueError(f"config.json: {key} is missing or not an object")
        text_dict = dict(cfg["text_config"])
        if config_dtype(text_dict) is None and config_dtype(cfg) is not None:
            text_dict["torch_dtype"] = config_dtype(cfg)
        try:
            text = ModelConfig.from_hf_config(text_dict)
        except KeyError as e:
            raise ValueError(f"config.json: text_config is missing field {e.args[0]!r}") from None
        except ValueError as e:
            raise ValueError(f"text_config: {e}") from None
        vision = VisionConfig.from_hf_config(cfg["vision_config"])
        out: dict[str, Any] = {}
        for key in ("image_token_index", "vision_feature_layer"):
            if key in cfg:
                out[key] = read_int(cfg[key], key)
        for key in ("projector_hidden_act", "vision_feature_select_strategy"):
            if key in cfg:
                out[key] = cfg[key]
        if "image_grid_pinpoints" in cfg:
            out["image_grid_pinpoints"] = cfg["image_grid_pinpoints"]
        return cls(text_config=text, vision_config=vision, **out)

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str) -> "VLConfig":
        if name not in VL_PRESETS:
            raise ValueError(f"unknown VL preset {name!r}; available: {', '.join(VL_PRESETS)}")
        return VL_PRESETS[name]()


def _vl_debug() -> VLConfig:
    """Tiny, for tests: 56 px tiles of 4 x 4 patches, a 2-layer tower on the `debug` LM."""
    vision = VisionConfig(image_size=56, patch_size=14, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=2)
    return VLConfig(text_config=ModelConfig.from_preset("debug"), vision_config=vision,
                    image_token_index=259)


def _minimax_vl_01() -> VLConfig:
    """Exactly the released MiniMax-VL-01 (VL01.md §1: max_position_embeddings 8192 there)."""
    text = ModelConfig.from_preset("minimax-text-01", max_position_embeddings=8192)
    return VLConfig(text_config=text, vision_config=VisionConfig())


VL_PRESETS = {"vl-debug": _vl_debug, "minimax-vl-01": _minimax_vl_01}
