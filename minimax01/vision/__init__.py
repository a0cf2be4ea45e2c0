"""MiniMax-VL-01's vision side (VL01.md): the CLIP ViT tower and projector, the any-res image
processor, the VL config and the full model. Usable alone: the tower needs only torch, the
processor Pillow."""

from .anyres import AnyRes
from .chat import encode_with_images, expand_image_ids, expand_image_placeholders, render_chat
from .config import VL_PRESETS, VisionConfig, VLConfig, grid_pinpoints
from .processor import ImageError, ImageProcessor, load_image
from .tower import Projector, VisionTower

__all__ = ["AnyRes", "ImageError", "ImageProcessor", "MiniMaxVLForConditionalGeneration",
           "Projector", "VL_PRESETS", "VLConfig", "VisionConfig", "VisionTower",
           "encode_with_images", "expand_image_ids", "expand_image_placeholders", "grid_pinpoints", "load_image",
           "render_chat"]


def __getattr__(name):  # the full model imports the language model: only when asked for
    if name == "MiniMaxVLForConditionalGeneration":
        from .model import MiniMaxVLForConditionalGeneration

        return MiniMaxVLForConditionalGeneration
    raise AttributeError(f"module 'minimax01.vision' has no attribute {name!r}")
