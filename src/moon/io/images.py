"""Images in MOON: decoded one way everywhere, and checked before they enter the items table.

`decode` is the only way a stage turns image bytes into pixels (the embedder, the
baseline, augmentation, distillation, near-duplicate detection, the simulator and the
report all use it), with one rule for everything a file can carry:

- EXIF orientation is applied, so a phone photo stored sideways is seen upright;
- transparent parts (an alpha channel, or a palette's transparent colour) are composed
  on white, as a shop page shows a cut-out product;
- every other mode (greyscale, palette, CMYK, 16-bit) is converted to RGB.

`check_image` decodes each ingested image fully once, so later stages can trust that
`items.image` opens. Images that fail say why, with one of the reject reasons of
`schema.REJECT_REASONS`.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, ImageOps

from moon.errors import Rejected

# Formats every later stage (and browsers) can read as they are: their bytes are kept untouched.
KEPT_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})
# Modes PNG can store; anything else (CMYK, YCbCr, LAB, ...) is converted before re-encoding.
PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"})


def decode(data: bytes | Image.Image, draft: tuple[int, int] | None = None) -> Image.Image:
    """An encoded image (or a PIL image) as upright RGB, transparency on white.

    `draft` (width, height) lets a JPEG decode at 1/2, 1/4 or 1/8 scale while still at least
    that large: much less work when only a small picture is needed.
    """
    if not isinstance(data, (bytes, bytearray)):  # a new image, never the caller's own
        return data.copy() if data.mode == "RGB" else to_rgb(data)
    with Image.open(io.BytesIO(data)) as image:
        if draft is not None:
            image.draft("RGB", draft)
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparent parts shown on white as a shop page shows them."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def central_square(image: Image.Image, side: int, resample=Image.BILINEAR) -> Image.Image:
    """The largest centred square of `image`, resampled to side x side pixels."""
    width, height = image.size
    square = min(width, height)
    left, top = (width - square) / 2, (height - square) / 2
    return image.resize((side, side), resample, box=(left, top, left + square, top + square))


class ImageError(Rejected):
    """An image that cannot be used; `reason` is one of the reject reasons."""


def read_image_file(path: Path) -> bytes:
    """An image file's bytes, or ImageError(missing_image) saying why they cannot be read."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageError("missing_image", f"image file {path} not found") from None
    except OSError as exc:
        raise ImageError("missing_image", f"cannot read image file {path}: {exc.strerror}") from None


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
    check_size(data, max_pixels)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return data if image.format in KEPT_FORMATS else _to_png(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("image_too_large", f"over ingest.max_image_pixels={max_pixels:,} (PIL: {exc})") from None
    except Exception as exc:  # decoders raise many types (OSError, SyntaxError, ValueError, ...)
        raise ImageError("corrupt_image", f"cannot decode image: {exc}") from None


def check_size(data: bytes, max_pixels: int, limit: str = "ingest.max_image_pixels") -> None:
    """Refuses (ImageError) an empty image, one whose header PIL cannot read, and one whose header
    claims more than `max_pixels` (the config key `limit`), without decoding its pixels."""
    if not data:
        raise ImageError("missing_image", "image is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("image_too_large", f"over {limit}={max_pixels:,} (PIL: {exc})") from None
    except Exception as exc:  # PIL raises many types for bytes that are not an image
        raise ImageError("corrupt_image", f"cannot decode image: {exc}") from None
    if width * height > max_pixels:
        raise ImageError("image_too_large", f"{width}x{height} = {width * height:,} pixels, over {limit}={max_pixels:,}")


def _to_png(image: Image.Image) -> bytes:
    if image.mode not in PNG_MODES:
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
