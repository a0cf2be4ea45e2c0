"""Images in requests: an OpenAI `image_url` (a `data:` URL, or a `file://` path under the one
folder the server allows) -> a decoded PIL image, under limits; and raw image bytes -> a PIL
image, for the server and the training data alike.

Nothing is fetched over the network: an http(s) URL is refused with a clear 400. Every failure
is a RequestError naming the offending field (`messages[1].content[0].image_url`) with a code:
"image_too_large" (bytes or pixels past the limit), "invalid_image" (bad base64, not an image,
truncated, empty), "unsupported_value" (a scheme or format this server does not take),
"too_many_images". Only the formats of Pillow listed in FORMATS are opened (no EPS, which would
run Ghostscript, nor the long tail of rarely used decoders); the pixel count is checked from the
header, before anything is decoded; an animated image gives its first frame."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .request import RequestError

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MAX_IMAGE_BYTES = 20 * 2 ** 20      # encoded size, as OpenAI's 20 MB per image
MAX_IMAGE_PIXELS = 6144 * 6144      # width x height (about 38M); 20000x20000 is refused
MAX_IMAGES = 16                      # per request
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?)"
                       r"(?P<b64>;base64)?,", re.IGNORECASE)


@dataclass(frozen=True)
class MediaPolicy:
    """What a server accepts. `allowed_local_path`: the folder `file://` URLs may read from
    (symlinks resolved; None: no local files at all)."""

    max_image_bytes: int = MAX_IMAGE_BYTES
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_images: int = MAX_IMAGES
    allowed_local_path: str | None = None

    def __post_init__(self):
        for name in ("max_image_bytes", "max_image_pixels", "max_images"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: must be a positive integer, got "
                                 f"{getattr(self, name)!r}")
        try:
            from PIL import Image as PILImage
        except ImportError:  # text-only serving needs no Pillow; image requests get a 400
            PILImage = None
        if PILImage is not None and PILImage.MAX_IMAGE_PIXELS \
                and self.max_image_pixels > PILImage.MAX_IMAGE_PIXELS:
            raise ValueError(f"max_image_pixels: {self.max_image_pixels} is above Pillow's own "
                             f"limit of {PILImage.MAX_IMAGE_PIXELS} pixels")
        if self.allowed_local_path is not None and not Path(self.allowed_local_path).is_dir():
            raise ValueError(f"allowed_local_path: no folder at {self.allowed_local_path}")


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image and the SHA-256 of its encoded bytes (what a cache keys it on)."""

    image: object   # PIL.Image.Image, loaded
    sha256: str


def load_image_url(url: str, policy: MediaPolicy, param: str) -> LoadedImage:
    """An OpenAI image_url's `url` -> LoadedImage; RequestError naming `param` when refused."""
    if not isinstance(url, str) or not url:
        raise RequestError(f"{param}: the image URL is empty", "invalid_image", param)
    head = url[:16].lower()
    if head.startswith("data:"):
        data = decode_data_url(url, policy.max_image_bytes, param)
    elif head.startswith("file:"):
        data = read_local(url, policy, param)
    elif head.startswith(("http:", "https:")):
        raise RequestError(f"{param}: this server does not fetch images over the network; "
                           "send the image inline as a data: URL (data:image/png;base64,...)",
                           "unsupported_value", param)
    else:
        scheme = url.split(":", 1)[0][:20] if ":" in url else ""
        raise RequestError(f"{param}: unsupported image URL{f' scheme {scheme!r}' if scheme else ''}"
                           "; send a data: URL (data:image/png;base64,...)",
                           "unsupported_value", param)
    return LoadedImage(open_image(data, policy.max_image_pixels, param),
                 hashlib.sha256(data).hexdigest())


def decode_data_url(url: str, max_bytes: int, param: str) -> bytes:
    """`data:image/...;base64,...` -> bytes, refused before decoding when it would be larger
    than `max_bytes`."""
    m = _DATA_URL.match(url[:512])
    if m is None:
        raise RequestError(f"{param}: a data: URL needs the form data:image/png;base64,...",
                           "invalid_image", param)
    mime = (m.group("mime") or "").lower()
    if mime and not mime.startswith("image/"):
        raise RequestError(f"{param}: the data: URL holds {mime!r}, not an image",
                           "invalid_image", param)
    if not m.group("b64"):
        raise RequestError(f"{param}: only base64 data: URLs are supported "
                           "(data:image/png;base64,...)", "invalid_image", param)
    return decode_base64(url[m.end():], max_bytes, param)


def decode_base64(text: str, max_bytes: int, param: str) -> bytes:
    payload = re.sub(r"\s+", "", text) if any(c.isspace() for c in text[:4096]) else text
    if len(payload) // 4 * 3 > max_bytes + 2:
        raise RequestError(f"{param}: the image is larger than {max_bytes} bytes",
                           "image_too_large", param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{param}: the image is not valid base64", "invalid_image",
                           param) from None
    if len(data) > max_bytes:
        raise RequestError(f"{param}: the image is larger than {max_bytes} bytes",
                           "image_too_large", param)
    if not data:
        raise RequestError(f"{param}: the image is empty", "invalid_image", param)
    return data


def read_local(url: str, policy: MediaPolicy, param: str) -> bytes:
    """`file:///abs/path` under `policy.allowed_local_path` (after resolving symlinks) -> bytes."""
    if policy.allowed_local_path is None:
        raise RequestError(f"{param}: this server does not read local files (start it with "
                           "--allowed-local-media-path DIR to allow a folder)",
                           "unsupported_value", param)
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise RequestError(f"{param}: a file URL must be file:///absolute/path",
                           "invalid_image", param)
    raw = unquote(parts.path)
    if "\x00" in raw or not raw.startswith("/"):
        raise RequestError(f"{param}: a file URL must be file:///absolute/path",
                           "invalid_image", param)
    root = Path(os.path.realpath(policy.allowed_local_path))
    path = Path(os.path.realpath(raw))
    if path != root and root not in path.parents:
        raise RequestError(f"{param}: the file is outside the folder this server reads images "
                           "from", "unsupported_value", param)
    try:  # O_NONBLOCK: a FIFO must not hang the server; fstat then says what it is
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise RequestError(f"{param}: cannot read the file ({e.strerror or type(e).__name__})",
                           "invalid_image", param) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > policy.max_image_bytes:
        os.close(fd)
        if not stat.S_ISREG(info.st_mode):
            raise RequestError(f"{param}: not a regular file", "invalid_image", param)
        raise RequestError(f"{param}: the image is larger than {policy.max_image_bytes} bytes",
                           "image_too_large", param)
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(policy.max_image_bytes + 1)
        except OSError as e:
            why = e.strerror or type(e).__name__
            raise RequestError(f"{param}: cannot read the file ({why})", "invalid_image",
                               param) from None
    if len(data) > policy.max_image_bytes:
        raise RequestError(f"{param}: the image is larger than {policy.max_image_bytes} bytes",
                           "image_too_large", param)
    if not data:
        raise RequestError(f"{param}: the image file is empty", "invalid_image", param)
    return data


def open_image(data: bytes, max_pixels: int, param: str):
    """Encoded bytes -> a loaded PIL image (the first frame of an animation); the pixel count is
    checked from the header, before decoding. RequestError for anything Pillow cannot read."""
    try:
        from PIL import Image as PILImage
        from PIL import UnidentifiedImageError
    except ImportError:
        raise RequestError(f"{param}: this server cannot decode images (Pillow is not "
                           "installed: pip install minimax01[vision])", "unsupported_value",
                           param) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            img = PILImage.open(io.BytesIO(data), formats=FORMATS)
            w, h = img.size
            if w < 1 or h < 1:
                raise RequestError(f"{param}: the image has no pixels ({w}x{h})",
                                   "invalid_image", param)
            if w * h > max_pixels:
                raise RequestError(f"{param}: the image has {w}x{h} = {w * h} pixels, more than "
                                   f"the limit of {max_pixels}", "image_too_large", param)
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            img.load()
    except RequestError:
        raise
    except UnidentifiedImageError:
        raise RequestError(f"{param}: not an image this server reads "
                           f"({', '.join(FORMATS)})", "invalid_image", param) from None
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning):
        raise RequestError(f"{param}: the image has more pixels than the limit of {max_pixels}",
                           "image_too_large", param) from None
    except Exception as e:  # truncated, corrupt, or a decoder's own refusal
        raise RequestError(f"{param}: the image cannot be decoded ({type(e).__name__}: "
                           f"{str(e)[:120]})", "invalid_image", param) from None
    return img
