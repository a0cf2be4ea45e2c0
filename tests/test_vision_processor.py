"""ImageProcessor: the tiles are the released processor's (thumbnail squash, keep-ratio BICUBIC
letterbox on black, raster order, CLIP normalisation), and hostile images get one-line errors or
the released conversions (truncated PNG, zero size, CMYK, palette, 16-bit, animated GIF, huge)."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from minimax01.vision import ImageError, ImageProcessor, VLConfig, load_image
from minimax01.vision.processor import CLIP_MEAN, CLIP_STD

PROC = ImageProcessor.from_config(VLConfig.from_preset("vl-debug"))  # 56 px tiles
MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(CLIP_STD).view(3, 1, 1)


def rgb(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def unnorm(x):
    return (x * STD + MEAN) * 255


def png(img, **kw):
    buf = io.BytesIO()
    img.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def test_tiles_are_the_released_layout():
    img = rgb(30, 100)                      # wide: grid 56 x 112 (1 x 2 tiles)
    out = PROC(img)
    px, = out["pixel_values"]
    assert out["image_sizes"] == [(30, 100)]
    assert px.shape == (3, 3, 56, 56) and px.dtype == torch.float32
    # thumbnail: the whole image squashed (not aspect-preserving) to one tile, BICUBIC
    thumb = torch.from_numpy(np.array(img.resize((56, 56), Image.BICUBIC))).permute(2, 0, 1)
    torch.testing.assert_close(unnorm(px[0]), thumb.float(), atol=1e-3, rtol=0)
    # grid: resized to 112 x int(112 * 30 / 100) = 33 rows, pasted at row (56 - 33) // 2 = 11
    canvas = np.zeros((56, 112, 3), np.uint8)
    canvas[11:44] = np.array(img.resize((112, 33), Image.BICUBIC))
    canvas = torch.from_numpy(canvas).permute(2, 0, 1).float()
    torch.testing.assert_close(unnorm(px[1]), canvas[:, :, :56], atol=1e-3, rtol=0)
    torch.testing.assert_close(unnorm(px[2]), canvas[:, :, 56:], atol=1e-3, rtol=0)
    # normalisation is ToTensor + Normalize: black padding is exactly -mean / std
    torch.testing.assert_close(px[1, :, 0], (-MEAN / STD).view(3, 1).expand(3, 56), atol=1e-6,
                               rtol=0)


def test_raster_order_of_tiles():
    """A 2 x 3 grid of flat colours comes back tile by tile, row by row."""
    cols = [(10 * k, 200 - 10 * k, 40) for k in range(6)]
    a = np.zeros((112, 168, 3), np.uint8)
    for k, c in enumerate(cols):
        r, q = divmod(k, 3)
        a[r * 56:(r + 1) * 56, q * 56:(q + 1) * 56] = c
    px = PROC(Image.fromarray(a))["pixel_values"][0]
    assert px.shape[0] == 7
    for k, c in enumerate(cols):
        torch.testing.assert_close(unnorm(px[1 + k]).mean((1, 2)), torch.tensor(c).float(),
                                   atol=0.05, rtol=0)


def test_token_counts_match_the_tiles():
    for h, w in [(1, 1), (56, 56), (30, 100), (500, 20), (17, 300), (1000, 1000)]:
        px = PROC(rgb(h, w))["pixel_values"][0]
        assert px.shape[0] == PROC.anyres.num_tiles(h, w)
        assert PROC.num_image_tokens(h, w) >= 16


def test_modes_are_converted_as_released():
    """RGBA (alpha dropped by convert("RGB"), not composited), CMYK, palette, grey: resized in
    their own mode, then converted, as the released processor does."""
    base = rgb(40, 70, 3)
    rgba = base.copy()
    rgba.putalpha(100)
    for mode in ("RGBA", "CMYK", "P", "L"):
        img = rgba if mode == "RGBA" else base.convert(mode)
        got = PROC(load_image(png(img, format="TIFF" if mode == "CMYK" else "PNG")))
        px = got["pixel_values"][0]
        ref = torch.cat([PROC._to_tensor(img.resize((56, 56), Image.BICUBIC).convert("RGB"))])
        torch.testing.assert_close(px[0], PROC._normalize(ref)[0], atol=1e-5, rtol=0)
        assert got["image_sizes"] == [(40, 70)]


def test_sixteen_bit_grey_is_scaled_not_clipped():
    a = (np.arange(40 * 70).reshape(40, 70) * 20).astype(np.uint16)  # up to ~56000
    img = load_image(png(Image.fromarray(a)))
    assert img.mode.startswith("I")
    px = PROC(img)["pixel_values"][0]
    eight = Image.fromarray((a / 257).round().astype(np.uint8), "L")
    torch.testing.assert_close(px, PROC(eight)["pixel_values"][0], atol=1e-5, rtol=0)
    assert unnorm(px[0]).max() > 200 and unnorm(px[0]).min() < 10  # the full range survives


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (60, 30), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    img = load_image(buf.getvalue())
    img.seek(1)
    px = PROC(img)["pixel_values"][0]
    centre = unnorm(px[0])[:, 28, 28]
    assert centre[0] > 200 and centre[2] < 50


def _png_header_only(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_huge_image_is_refused_before_decoding():
    with pytest.raises(ImageError, match=r"image 0 is too large.*400000000 pixels"):
        PROC([_png_header_only(20000, 20000)])  # (Pillow's own limit speaks first here)
    with pytest.raises(ImageError, match=r"too large: 9000x9000 = 81000000 pixels > max_pixels"):
        PROC([_png_header_only(9000, 9000)])
    proc = ImageProcessor.from_config(VLConfig.from_preset("vl-debug"), max_pixels=1000)
    with pytest.raises(ImageError, match="image 1 is too large: 50x50"):
        proc([rgb(10, 10), rgb(50, 50)])
    with pytest.raises(ValueError, match="max_pixels must be positive"):
        ImageProcessor(max_pixels=0)


def test_bad_images_get_one_line():
    data = png(rgb(64, 64))
    cases = {"truncated": data[: len(data) // 2], "garbage": b"not an image at all",
             "empty": b""}
    for name, blob in cases.items():
        with pytest.raises(ImageError, match="image 0 is not a readable image") as e:
            PROC([blob])
        assert "\n" not in str(e.value), name
    with pytest.raises(ImageError, match=r"zero size \(0x5 pixels\)"):
        PROC([Image.new("RGB", (0, 5))])
    with pytest.raises(ImageError, match="no image file at"):
        PROC(["/nonexistent/x.png"])
    with pytest.raises(ImageError, match="float pixels"):
        PROC([Image.new("F", (8, 8))])


def test_chat_template_and_expansion():
    from minimax01.tokenizer import ByteTokenizer
    from minimax01.vision import (encode_with_images, expand_image_ids,
                                  expand_image_placeholders, render_chat)

    text = render_chat([
        {"role": "system", "content": "You are a helpful assistant created by Minimax based on "
                                      "MiniMax-VL-01 model."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                         "text": "Describe this image."}]}])
    assert text == ("<beginning_of_sentence>system ai_setting=assistant\nYou are a helpful "
                    "assistant created by Minimax based on MiniMax-VL-01 model.<end_of_sentence>\n"
                    "<beginning_of_sentence>user name=user\n<image>Describe this image."
                    "<end_of_sentence>\n<beginning_of_sentence>ai name=assistant\n")
    sizes = [(30, 100), (56, 56)]
    n = [PROC.num_image_tokens(*s) for s in sizes]
    out = expand_image_placeholders("a<image>b<image>c", sizes, PROC)
    assert out == "a" + "<image>" * n[0] + "b" + "<image>" * n[1] + "c"
    assert expand_image_ids([1, 9, 2, 9], sizes, PROC, 9) == [1] + [9] * n[0] + [2] + [9] * n[1]
    ids = encode_with_images(ByteTokenizer(), "hi", sizes[:1], PROC, 300)
    assert ids == [300] * n[0] + list(b"hi")  # no placeholder: the images go first
    with pytest.raises(ValueError, match="1 <image> placeholder"):
        expand_image_placeholders("<image>", sizes, PROC)
    with pytest.raises(ValueError, match="messages\\[0\\].content\\[0\\] must be a text or image"):
        render_chat([{"role": "user", "content": [{"type": "audio"}]}])
