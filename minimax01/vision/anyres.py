"""Any-resolution arithmetic of MiniMax-VL-01 (VL01.md §4-5), on integers only: which grid an
image is cut into, how it is letterboxed into that grid, how many feature tokens it gives, and
how the tiles' features are stitched, unpadded and given a newline per row.

Sizes are (height, width) in our API. The released processor reads the pinpoint pairs as
(width, height) and its model as (height, width); the released list is transpose-symmetric, so
both choose the same grid (tests/test_vision_anyres.py checks it against transformers' LLaVA-NeXT
functions over thousands of sizes). We follow the processor, which decides the pixels."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Box:
    """Where the resized image sits on the grid canvas, in pixels."""

    height: int
    width: int
    top: int
    left: int


@dataclass(frozen=True)
class AnyRes:
    """The any-res geometry: `tile` px square tiles of `patch` px ViT patches, grid `pinpoints`."""

    tile: int
    patch: int
    pinpoints: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, vl_config) -> "AnyRes":
        v = vl_config.vision_config
        return cls(v.image_size, v.patch_size, tuple(tuple(p) for p in
                                                     vl_config.image_grid_pinpoints))

    @property
    def patches_per_side(self) -> int:
        return self.tile // self.patch

    @staticmethod
    def _check(height: int, width: int) -> None:
        if not (isinstance(height, int) and isinstance(width, int)) or height < 1 or width < 1:
            raise ValueError(f"image size must be positive integers (height, width), got "
                             f"({height!r}, {width!r})")

    def best_resolution(self, height: int, width: int) -> tuple[int, int]:
        """(grid height, grid width) in pixels: the pinpoint that keeps most of the image's
        pixels after an aspect-preserving fit (capped at the original's), then wastes least."""
        self._check(height, width)
        best, best_eff, best_waste = None, 0, float("inf")
        for gw, gh in self.pinpoints:  # the processor's (width, height) reading
            scale = min(gw / width, gh / height)
            eff = min(int(width * scale) * int(height * scale), width * height)
            waste = gw * gh - eff
            if eff > best_eff or (eff == best_eff and waste < best_waste):
                best, best_eff, best_waste = (gh, gw), eff, waste
        return best

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of tiles."""
        gh, gw = self.best_resolution(height, width)
        return gh // self.tile, gw // self.tile

    def num_tiles(self, height: int, width: int) -> int:
        """ViT inputs of one image: the thumbnail plus the grid tiles."""
        rows, cols = self.grid(height, width)
        return 1 + rows * cols

    def letterbox(self, height: int, width: int) -> Box:
        """The released keep-ratio resize onto the grid canvas: the long side (relative to the
        canvas) fills it, the other is floored, and the image is centred (the odd padding pixel
        goes to the bottom / right). A side that would floor to 0 px is kept at 1 px (the
        released code fails there)."""
        gh, gw = self.best_resolution(height, width)
        if width / height > gw / gh:
            new_h = max(1, int(gw * height / width))
            return Box(new_h, gw, (gh - new_h) // 2, 0)
        new_w = max(1, int(gh * width / height))
        return Box(gh, new_w, 0, (gw - new_w) // 2)

    def unpadded(self, height: int, width: int) -> Box:
        """The part of the stitched feature grid that is image, not letterbox (in feature
        cells): the padding is removed equally from both ends, on integers (get_num_token)."""
        rows, cols = self.grid(height, width)
        n = self.patches_per_side
        cur_h, cur_w = rows * n, cols * n
        if width / height > cur_w / cur_h:
            pad = (cur_h - (height * cur_w) // width) // 2
            return Box(cur_h - 2 * pad, cur_w, pad, 0)
        pad = (cur_w - (width * cur_h) // height) // 2
        return Box(cur_h, cur_w - 2 * pad, 0, pad)

    def num_image_tokens(self, height: int, width: int) -> int:
        """`<image>` tokens of one image: the thumbnail's n x n, then a newline per kept row."""
        box = self.unpadded(height, width)
        return self.patches_per_side ** 2 + box.height * (box.width + 1)

    def pack(self, features: torch.Tensor, height: int, width: int,
             newline: torch.Tensor) -> torch.Tensor:
        """features [tiles, n*n, D] of one image (thumbnail first, then the grid tiles in raster
        order) -> [num_image_tokens, D]: the thumbnail's tokens, then the stitched grid (row-major
        over the whole image), unpadded, with `newline` [D] after every row."""
        rows, cols = self.grid(height, width)
        n = self.patches_per_side
        t, d = features.shape[0], features.shape[-1]
        if t != 1 + rows * cols or features.shape[1] != n * n:
            raise ValueError(f"an image of {height}x{width} (HxW) needs {1 + rows * cols} tiles "
                             f"of {n * n} features ({rows}x{cols} grid + thumbnail), got "
                             f"{list(features.shape[:2])}")
        grid = features[1:].reshape(rows, cols, n, n, d).permute(0, 2, 1, 3, 4)
        grid = grid.reshape(rows * n, cols * n, d)
        box = self.unpadded(height, width)
        grid = grid[box.top:box.top + box.height, box.left:box.left + box.width]
        nl = newline.to(grid.dtype).expand(box.height, 1, d)
        return torch.cat([features[0], torch.cat([grid, nl], 1).reshape(-1, d)])
