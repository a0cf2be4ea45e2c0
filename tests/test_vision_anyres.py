"""Any-res arithmetic (vision/anyres.py) against transformers' LLaVA-NeXT functions (the model
side of the released code) and the released examples (VL01.md §5): grid choice, letterbox,
unpadding, token counts, over many sizes incl. extreme aspect ratios, 1x1 px and huge images."""

import random

import pytest
import torch

from minimax01.vision import AnyRes, ImageProcessor, VLConfig, grid_pinpoints

FULL = ImageProcessor().anyres
SIZES = sorted({(h, w) for h, w in
                [(1, 1), (1, 20000), (20000, 1), (2, 3), (336, 336), (480, 640), (1080, 1920),
                 (2000, 1000), (4000, 4000), (335, 337), (100000, 7), (7, 100000), (672, 671),
                 (1344, 1344), (2016, 1008), (50000, 50000)]
                + [(random.Random(s).randint(1, 3000), random.Random(s + 1).randint(1, 3000))
                   for s in range(3000)]
                + [(random.Random(s).randint(1, 40), random.Random(-s).randint(1, 40))
                   for s in range(400)]})


@pytest.mark.parametrize("hw,tiles,tokens", [
    ((336, 336), 2, 1176), ((480, 640), 5, 2340), ((1080, 1920), 19, 9864),
    ((2000, 1000), 19, 11088), ((4000, 4000), 17, 9888)])
def test_released_examples(hw, tiles, tokens):
    assert FULL.num_tiles(*hw) == tiles
    assert FULL.num_image_tokens(*hw) == tokens


def test_pinpoints_are_the_released_28():
    pins = grid_pinpoints()
    assert len(pins) == 28 and [336, 336] in pins and [1344, 1344] in pins
    excluded = [(1344, 1680), (1680, 1680), (1680, 2016), (2016, 2016), (1344, 2016)]
    for a, b in excluded:
        assert [a, b] not in pins and [b, a] not in pins
    assert sorted(map(tuple, pins)) == sorted((b, a) for a, b in pins)  # transpose-symmetric
    assert max(a * b for a, b in pins) == 18 * 336 * 336


def test_grid_choice_matches_transformers():
    """Our processor reads pinpoints as (width, height), transformers' LLaVA-NeXT (the model
    side) as (height, width): on the symmetric list they choose the same grid everywhere."""
    tf = pytest.importorskip("transformers.image_processing_utils")
    pins = grid_pinpoints()
    for h, w in SIZES:
        assert FULL.best_resolution(h, w) == tuple(tf.select_best_resolution((h, w), pins)), (h, w)


def test_unpadding_matches_transformers_unpad_image():
    llava = pytest.importorskip("transformers.models.llava_next.modeling_llava_next")
    for h, w in SIZES:
        rows, cols = FULL.grid(h, w)
        grid = torch.arange(rows * 24 * cols * 24).view(1, rows * 24, cols * 24)
        ref = llava.unpad_image(grid, (h, w))
        box = FULL.unpadded(h, w)
        assert tuple(ref.shape[1:]) == (box.height, box.width), (h, w)
        ours = grid[:, box.top:box.top + box.height, box.left:box.left + box.width]
        assert torch.equal(ours, ref)
        rh, rw = llava.get_anyres_image_grid_shape((h, w), grid_pinpoints(), 336)
        assert (rh, rw) == (rows, cols)


def test_letterbox_fits_and_centres():
    for h, w in SIZES:
        gh, gw = FULL.best_resolution(h, w)
        box = FULL.letterbox(h, w)
        assert 1 <= box.height <= gh and 1 <= box.width <= gw
        assert box.height == gh or box.width == gw  # one side fills the canvas
        assert box.top == (gh - box.height) // 2 and box.left == (gw - box.width) // 2
        # an extreme aspect ratio (1 x 20000) can keep no grid row at all, as released: the
        # image is then its thumbnail's 576 tokens
        u = FULL.unpadded(h, w)
        assert u.height >= 0 and u.width >= 0 and (u.height >= 1 or max(h, w) > 20 * min(h, w))
        assert FULL.num_image_tokens(h, w) == 576 + u.height * (u.width + 1)


def test_pack_gives_num_image_tokens_features():
    """The packed features of every size have exactly num_image_tokens rows; the thumbnail comes
    first, each kept row ends with the newline, and the unpadded rows are the image's."""
    geo = AnyRes.of(VLConfig.from_preset("vl-debug"))  # 56 px tiles, 4 x 4 patches
    newline = torch.full((3,), -1.0)
    for h, w in SIZES[::7]:
        rows, cols = geo.grid(h, w)
        n = geo.patches_per_side
        # feature value = (row, col) of its cell in the stitched grid, thumbnail = 99
        r = torch.arange(rows * n).view(rows, 1, n, 1).expand(rows, cols, n, n)
        c = torch.arange(cols * n).view(1, cols, 1, n).expand(rows, cols, n, n)
        tiles = torch.stack([r, c, torch.zeros_like(r)], -1).reshape(rows * cols, n * n, 3).float()
        feats = torch.cat([torch.full((1, n * n, 3), 99.0), tiles])
        out = geo.pack(feats, h, w, newline)
        assert out.shape[0] == geo.num_image_tokens(h, w), (h, w)
        assert bool((out[:n * n] == 99).all())
        box = geo.unpadded(h, w)
        if box.height == 0 or box.width == 0:  # extreme aspect ratio: thumbnail (+ newlines)
            continue
        grid = out[n * n:].view(box.height, box.width + 1, 3)
        assert bool((grid[:, -1] == -1).all())
        assert torch.equal(grid[:, 0, 0], torch.arange(box.top, box.top + box.height).float())
        assert torch.equal(grid[0, :-1, 1], torch.arange(box.left, box.left + box.width).float())


def test_pack_refuses_wrong_tile_count():
    geo = AnyRes.of(VLConfig.from_preset("vl-debug"))
    with pytest.raises(ValueError, match="needs 3 tiles"):
        geo.pack(torch.zeros(2, 16, 4), 56, 112, torch.zeros(4))


@pytest.mark.parametrize("bad", [(0, 5), (5, 0), (-1, 3), (2.5, 3)])
def test_bad_sizes(bad):
    with pytest.raises(ValueError, match="positive integers"):
        FULL.num_image_tokens(*bad)
