"""Checking catalogue images before they enter the items table.

Every kept image is fully decoded once here, so later stages can trust that `items.image`
opens. Images that fail say why, with one of the reject reasons of `schema.REJECT_REASONS`.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image

# Formats every later stage (and browsers) can read as they are: their bytes are kept untouched.
KEPT_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})
# Modes PNG can store; anything else (CMYK, YCbCr, LAB, ...) is converted before re-encoding.
PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"})


class ImageError(Exception):
    """An image that cannot be used; `reason` is one of the reject reasons."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """Sets PIL's decompression-bomb guard to our limit and makes its warning an error.

    PIL checks sizes on its own while opening, and for some formats (GIF, ICO, ICNS) while
    loading frames whose size the header does not tell. With the same limit it agrees with
    `check_image`; escalating its warning means an oversized image is rejected instead of
    printing a warning and being decoded anyway.
    """
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def check_image(data: bytes, max_pixels: int) -> bytes:
    """Returns the bytes to store for an encoded image, or raises ImageError.

    The header's dimensions are checked before decoding, so an oversized image never
    allocates its pixels; then the whole image is decoded, because a truncated file
    often has a perfectly valid header. Inside `pixel_limit` PIL's own guard usually
    fires first, while opening; the explicit check keeps the limit when called outside it.
    """
    if not data:
        raise ImageError("missing_image", "image is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(
                    "image_too_large",
                    f"{width}x{height} = {width * height:,} pixels, over ingest.max_image_pixels={max_pixels:,}",
                )
            image.load()
            return data if image.format in KEPT_FORMATS else _to_png(image)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("image_too_large", f"over ingest.max_image_pixels={max_pixels:,} (PIL: {exc})") from None
    except Exception as exc:  # decoders raise many types (OSError, SyntaxError, ValueError, ...)
        raise ImageError("corrupt_image", f"cannot decode image: {exc}") from None


def _to_png(image: Image.Image) -> bytes:
    if image.mode not in PNG_MODES:
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
