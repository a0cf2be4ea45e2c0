"""`ImageProcessor`: PIL images -> the tiles MiniMax-VL-01 sees (VL01.md §4), as the released
image processor makes them: the any-res grid choice, a keep-ratio BICUBIC resize letterboxed on
black, the canvas cut into tiles in raster order, the thumbnail (the whole image squashed to one
tile) first, RGB in [0, 1] normalised with the OpenAI-CLIP mean and std.

Hostile images get one line (`ImageError`, a ValueError) or the released processor's conversion:
a truncated or unreadable file, a zero-size image or one over `max_pixels` (checked from the
header, before decoding) are errors; CMYK, palette, grey, alpha images are resized in their own
mode and then converted to RGB, as released (a palette image therefore resizes nearest-neighbour,
which PIL does for palettes, and alpha is dropped, not composited); an animated image gives its
first frame. Pillow itself refuses images over twice `PIL.Image.MAX_IMAGE_PIXELS` (179M pixels)
whatever `max_pixels` says. 16-bit grey (modes I;16 and I) is scaled to 8 bits (x / 257) first — the released
processor's PIL conversion would clip it at 255 instead; float images (mode F) are refused."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch

from .anyres import AnyRes
from .config import VLConfig, grid_pinpoints

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_PIXELS = 1 << 26   # 67M pixels (e.g. 8192 x 8192); a 20000 x 20000 image is refused


class ImageError(ValueError):
    """An image that cannot be used; the message is one line naming the image and why."""


def _pil():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency of the vision extra
        raise ImportError("minimax01.vision needs Pillow: pip install pillow") from None
    return Image


def _check_size(width: int, height: int, max_pixels: int | None, what: str) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"{what} has zero size ({width}x{height} pixels)")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(f"{what} is too large: {width}x{height} = {width * height} pixels > "
                         f"max_pixels {max_pixels}")


def load_image(source, max_pixels: int | None = MAX_PIXELS, what: str = "image"):
    """A PIL image, decoded, from a path, bytes, a binary file or a PIL image. The size limit is
    checked from the header, before the pixels are decoded."""
    Image = _pil()
    if isinstance(source, Image.Image):
        _check_size(source.width, source.height, max_pixels, what)
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    elif isinstance(source, (str, Path)):
        if not Path(source).is_file():
            raise ImageError(f"{what}: no image file at {source}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source)
            _check_size(img.width, img.height, max_pixels, what)
            img.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{what} is too large for Pillow: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{what} is not a readable image ({type(e).__name__}: {e})") from None
    return img


def _as_resizable(img, what: str):
    """An image in a mode PIL resizes like the released processor does (see module docstring)."""
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(img).astype(np.int64)
        return _pil().fromarray((np.clip(a, 0, 65535) / 257).round().astype(np.uint8), "L")
    if img.mode == "F":
        raise ImageError(f"{what} has float pixels (mode F); convert it to 8-bit RGB first")
    return img


class ImageProcessor:
    """`ImageProcessor()(images)` -> {"pixel_values": [tensor [tiles, 3, S, S] per image],
    "image_sizes": [(height, width) per image]}; `num_image_tokens(height, width)` is how many
    `<image>` tokens the model expects for an image of that size. Defaults: the released VL-01
    (336 px tiles, 14 px patches, the 28 grid pinpoints, CLIP mean/std)."""

    def __init__(self, image_size: int = 336, patch_size: int = 14,
                 image_grid_pinpoints: list[list[int]] | None = None,
                 image_mean=CLIP_MEAN, image_std=CLIP_STD, max_pixels: int | None = MAX_PIXELS):
        pins = image_grid_pinpoints or grid_pinpoints(image_size)
        self.anyres = AnyRes(image_size, patch_size, tuple(tuple(p) for p in pins))
        self.image_size = image_size
        self.mean = torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1)
        if max_pixels is not None and max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive (or None), got {max_pixels}")
        self.max_pixels = max_pixels

    @classmethod
    def from_config(cls, config: VLConfig, **options) -> "ImageProcessor":
        v = config.vision_config
        return cls(v.image_size, v.patch_size, config.image_grid_pinpoints, **options)

    def num_image_tokens(self, height: int, width: int) -> int:
        return self.anyres.num_image_tokens(height, width)

    def __call__(self, images) -> dict:
        if not isinstance(images, (list, tuple)):
            images = [images]
        pixel_values, sizes = [], []
        for i, image in enumerate(images):
            what = f"image {i}"
            img = _as_resizable(load_image(image, self.max_pixels, what), what)
            pixel_values.append(self.tiles(img))
            sizes.append((img.height, img.width))
        return {"pixel_values": pixel_values, "image_sizes": sizes}

    def tiles(self, img) -> torch.Tensor:
        """One PIL image -> [1 + rows * cols, 3, S, S]: thumbnail, then the grid in raster order."""
        Image = _pil()
        s, h, w = self.image_size, img.height, img.width
        box = self.anyres.letterbox(h, w)
        gh, gw = self.anyres.best_resolution(h, w)
        canvas = Image.new("RGB", (gw, gh), (0, 0, 0))
        canvas.paste(img.resize((box.width, box.height), Image.BICUBIC).convert("RGB"),
                     (box.left, box.top))
        thumb = img.resize((s, s), Image.BICUBIC).convert("RGB")
        grid = self._to_tensor(canvas)  # [1, 3, gh, gw]
        rows, cols = gh // s, gw // s
        grid = grid.reshape(3, rows, s, cols, s).permute(1, 3, 0, 2, 4).reshape(-1, 3, s, s)
        return self._normalize(torch.cat([self._to_tensor(thumb), grid]))

    @staticmethod
    def _to_tensor(img) -> torch.Tensor:
        """RGB uint8 -> [1, 3, H, W] float32 in [0, 1] (as torchvision's ToTensor)."""
        return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)[None].float() \
            .div(255)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
