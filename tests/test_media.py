"""Images in requests (infer/media.py): data: URLs and allowed local files decode to the same
pixels; every refusal is a RequestError naming the field with a code (never another
exception): network URLs, bad base64, non-images, truncated files, size and pixel limits,
paths outside the allowed folder; odd but valid images (CMYK, palette, 16-bit, animated) load."""

import base64
import hashlib
import io
import os
import random
import struct
import zlib

import pytest

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from minimax01.infer.media import (MediaPolicy, decode_data_url, load_image_url,  # noqa: E402
                                   open_image)
from minimax01.infer.request import RequestError  # noqa: E402

P = "messages[1].content[0].image_url"


def encode(img, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def picture(w=23, h=17, mode="RGB"):
    img = Image.new("RGB", (w, h))
    img.putdata([(x * 11 % 256, y * 13 % 256, (x + y) * 7 % 256) for y in range(h)
                 for x in range(w)])
    return img.convert(mode)


def refused(url, code, policy=MediaPolicy(), fragment=""):
    with pytest.raises(RequestError) as e:
        load_image_url(url, policy, P)
    assert e.value.code == code and e.value.param == P, (e.value.code, e.value.message)
    assert e.value.message.startswith(P) and fragment in e.value.message, e.value.message
    return e.value


def png_header_only(w, h) -> bytes:
    """A PNG whose header claims w x h pixels (and one tiny IDAT): what a pixel bomb looks like
    before it is decoded."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
            + chunk(b"IEND", b""))


def test_data_url_gives_the_same_pixels_and_a_content_hash():
    img = picture()
    data = encode(img)
    got = load_image_url(data_url(data), MediaPolicy(), P)
    assert got.image.convert("RGB").tobytes() == img.tobytes()
    assert got.sha256 == hashlib.sha256(data).hexdigest()
    # whitespace in the base64 (line-wrapped encoders), mime parameters, no mime at all
    wrapped = base64.encodebytes(data).decode()
    assert load_image_url("data:image/png;base64," + wrapped, MediaPolicy(), P).sha256 == \
        got.sha256
    assert load_image_url(data_url(data, "image/png;name=a.png"), MediaPolicy(), P).sha256 == \
        got.sha256
    assert load_image_url("data:;base64," + base64.b64encode(data).decode(), MediaPolicy(),
                          P).sha256 == got.sha256


@pytest.mark.parametrize("fmt,mode", [("JPEG", "RGB"), ("JPEG", "CMYK"), ("JPEG", "L"),
                                      ("PNG", "P"), ("PNG", "LA"), ("PNG", "RGBA"),
                                      ("PNG", "I;16"), ("BMP", "RGB"), ("GIF", "P"),
                                      ("WEBP", "RGB")])
def test_odd_but_valid_images_load(fmt, mode):
    img = picture(mode=mode)
    got = load_image_url(data_url(encode(img, fmt)), MediaPolicy(), P).image
    assert got.size == img.size and got.convert("RGB").size == img.size


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    got = load_image_url(data_url(buf.getvalue(), "image/gif"), MediaPolicy(), P).image
    assert got.convert("RGB").getpixel((3, 3)) == (255, 0, 0)


@pytest.mark.parametrize("url,code,fragment", [
    ("http://example.com/cat.png", "unsupported_value", "does not fetch"),
    ("HTTPS://example.com/cat.png", "unsupported_value", "does not fetch"),
    ("ftp://example.com/cat.png", "unsupported_value", "'ftp'"),
    ("cat.png", "unsupported_value", "unsupported image URL"),
    ("", "invalid_image", "empty"),
    ("data:image/png;base64,@@@@", "invalid_image", "base64"),
    ("data:image/png;base64,iVBORw0KGgo", "invalid_image", "base64"),   # bad padding
    ("data:image/png;base64,", "invalid_image", "empty"),
    ("data:image/png,rawbytes", "invalid_image", "only base64"),
    ("data:text/plain;base64,aGVsbG8=", "invalid_image", "not an image"),
    ("data:image/png;base64,aGVsbG8gd29ybGQ=", "invalid_image", "not an image"),
    ("data:nothing", "invalid_image", "data:image/png;base64"),
    ("file:///etc/passwd", "unsupported_value", "--allowed-local-media-path"),
])
def test_refusals(url, code, fragment):
    refused(url, code, fragment=fragment)


def test_truncated_and_corrupt_images():
    data = encode(picture(64, 64))
    refused(data_url(data[: len(data) // 2]), "invalid_image", fragment="cannot be decoded")
    jpeg = encode(picture(64, 64), "JPEG")
    refused(data_url(jpeg[:200], "image/jpeg"), "invalid_image")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    refused(data_url(eps), "invalid_image", fragment="not an image this server reads")


def test_size_and_pixel_limits():
    small = MediaPolicy(max_image_bytes=1000, max_image_pixels=400)
    refused("data:image/png;base64," + "A" * 100_000, "image_too_large", small, "1000 bytes")
    refused(data_url(encode(picture(21, 20))), "image_too_large", small, "21x20 = 420 pixels")
    assert load_image_url(data_url(encode(picture(20, 20))), small, P).image.size == (20, 20)
    bomb = png_header_only(20000, 20000)
    assert len(bomb) < 100
    refused(data_url(bomb), "image_too_large", fragment="pixels than the limit")
    refused(data_url(png_header_only(7000, 7000)), "image_too_large", fragment="7000x7000")
    refused(data_url(png_header_only(0, 5)), "invalid_image")
    with pytest.raises(ValueError, match="max_images"):
        MediaPolicy(max_images=0)
    with pytest.raises(ValueError, match="Pillow"):
        MediaPolicy(max_image_pixels=10 ** 12)


def test_local_files_only_under_the_allowed_folder(tmp_path):
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    data = encode(picture())
    (root / "sub" / "a b.png").write_bytes(data)
    (tmp_path / "secret.png").write_bytes(data)
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    (root / "empty.png").write_bytes(b"")
    policy = MediaPolicy(allowed_local_path=str(root))
    got = load_image_url(f"file://{root}/sub/a%20b.png", policy, P)
    assert got.sha256 == hashlib.sha256(data).hexdigest()
    assert load_image_url(f"file://localhost{root}/sub/a%20b.png", policy, P).sha256 == got.sha256
    for url in (f"file://{tmp_path}/secret.png", f"file://{root}/../secret.png",
                f"file://{root}/link.png"):
        refused(url, "unsupported_value", policy, "outside the folder")
    refused(f"file://{root}/sub", "invalid_image", policy, "not a regular file")
    os.mkfifo(root / "fifo.png")  # opening it for reading must not wait for a writer
    refused(f"file://{root}/fifo.png", "invalid_image", policy, "not a regular file")
    refused(f"file://{root}/missing.png", "invalid_image", policy, "cannot read")
    refused(f"file://{root}/empty.png", "invalid_image", policy, "empty")
    refused(f"file://otherhost{root}/sub/a%20b.png", "invalid_image", policy, "file:///")
    refused(f"file://{root}/sub/a%00.png", "invalid_image", policy)
    big = MediaPolicy(max_image_bytes=50, allowed_local_path=str(root))
    refused(f"file://{root}/sub/a%20b.png", "image_too_large", big)
    with pytest.raises(ValueError, match="no folder"):
        MediaPolicy(allowed_local_path=str(tmp_path / "nope"))


def test_fuzzed_images_only_ever_give_request_errors():
    rng = random.Random(0)
    seeds = [encode(picture(16, 12)), encode(picture(16, 12), "JPEG"),
             encode(picture(16, 12, "P"), "GIF"), encode(picture(16, 12), "BMP")]
    ok = bad = 0
    for i in range(300):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 8)):
            op = rng.random()
            pos = rng.randrange(len(data))
            if op < 0.5:
                data[pos] = rng.randrange(256)
            elif op < 0.8:
                del data[pos:pos + rng.randint(1, 50)]
            else:
                data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 20)))
        try:
            open_image(bytes(data), 10 ** 6, P)
            ok += 1
        except RequestError as e:
            assert e.param == P and e.code in ("invalid_image", "image_too_large")
            bad += 1
    assert ok > 0 and bad > 0, (ok, bad)  # both kinds happened


def test_decode_data_url_alone():
    assert decode_data_url(data_url(b"\x89PNG"), 10, P) == b"\x89PNG"
