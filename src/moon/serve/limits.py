"""What one request may ask for, and turning its texts and base64 images into model inputs.

Every check here runs before any work: a body too large, too many inputs, a text too long, an
image too many bytes or too many pixels is refused with 413; an input that cannot be used
(not base64, not an image, an empty text) with 422. Each refusal is a `RequestError` whose
message names the input and the limit, so a client can act on it.

An image's pixel count is read from its header, before it is decoded: a decompression bomb (a
few kilobytes that claim gigapixels) is refused without allocating its pixels. Only then is it
decoded, by `moon.io.images.decode`, the decoder every stage uses, so a served photo is seen
exactly as `moon embed` sees a catalogue image. The model is handed the decoded image, never
the bytes, so request bytes are not kept in the model's per-process cache of catalogue images.
"""

from __future__ import annotations

import base64
import binascii
import math
import re

from PIL import Image

from moon.config import ServeConfig
from moon.io.images import ImageError, check_image, check_size, decode
from moon.model.inputs import Input

DATA_URI = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)


class RequestError(Exception):
    """A request the service refuses: `status` is its HTTP status, the message says what to change."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def too_large(message: str) -> RequestError:
    return RequestError(413, message)


def unusable(message: str) -> RequestError:
    return RequestError(422, message)


def check_count(count: int, limit: int, what: str, key: str) -> None:
    """Refuses an empty list, and one longer than `limit` (serve.`key`)."""
    if count == 0:
        raise unusable(f"{what}: the list is empty; send at least one")
    if count > limit:
        raise too_large(f"{what}: {count} in one request, over serve.{key}={limit}; split it into several requests")


def check_text(text: str, limits: ServeConfig, where: str) -> str:
    if not text.strip():
        raise unusable(f"{where}: the text is empty")
    if len(text) > limits.max_text_chars:
        raise too_large(f"{where}: {len(text):,} characters, over serve.max_text_chars={limits.max_text_chars:,}")
    return text


def image_bytes(encoded: str, limits: ServeConfig, where: str) -> bytes:
    """The bytes of a base64 image (plain, or a `data:image/...;base64,` URI), size-checked before and
    after decoding the base64."""
    encoded = DATA_URI.sub("", encoded.strip(), count=1)
    if len(encoded) > 4 * math.ceil(limits.max_image_bytes / 3) + 4:
        raise too_large(f"{where}: the image is over serve.max_image_bytes={limits.max_image_bytes:,} bytes")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise unusable(f"{where}: the image is not valid base64 (standard alphabet, padded): encode the file's "
                       "bytes with base64") from None
    if not data:
        raise unusable(f"{where}: the image is empty (0 bytes)")
    if len(data) > limits.max_image_bytes:
        raise too_large(f"{where}: the image is {len(data):,} bytes, over serve.max_image_bytes="
                        f"{limits.max_image_bytes:,}")
    return data


def check_pixels(data: bytes, limits: ServeConfig, where: str) -> None:
    """Refuses an image whose header claims more than serve.max_image_pixels, without decoding it."""
    try:
        check_size(data, limits.max_image_pixels, "serve.max_image_pixels")
    except ImageError as exc:
        if exc.reason == "image_too_large":
            raise too_large(f"{where}: the image is {exc}") from None
        raise unusable(f"{where}: the bytes are not an image PIL reads ({exc}); send JPEG, PNG or WebP") from None


def photo(encoded: str, limits: ServeConfig, where: str) -> Image.Image:
    """A base64 image as the pixels every stage sees (upright RGB), after every limit is checked."""
    data = image_bytes(encoded, limits, where)
    check_pixels(data, limits, where)
    try:
        return decode(data)
    except Exception as exc:  # a valid header over truncated or corrupt data fails only here
        raise unusable(f"{where}: the image cannot be decoded ({exc}); send JPEG, PNG or WebP") from None


def catalogue_image(encoded: str, limits: ServeConfig, where: str) -> tuple[bytes, Image.Image]:
    """An item's base64 image as the bytes the items table keeps (checked as `moon ingest` checks a
    catalogue image; unusual formats re-encoded as PNG) and its decoded pixels."""
    data = image_bytes(encoded, limits, where)
    check_pixels(data, limits, where)
    try:
        kept = check_image(data, limits.max_image_pixels)
    except ImageError as exc:
        status = 413 if exc.reason == "image_too_large" else 422
        raise RequestError(status, f"{where}: {exc}") from None
    return kept, decode(kept)


def model_input(text: str | None, image: str | None, limits: ServeConfig, where: str) -> Input:
    """One query as the model takes it: a text, an image, or both (as an item is shown)."""
    if text is None and image is None:
        raise unusable(f"{where}: give a text, an image (base64) or both")
    return Input(None if text is None else check_text(text, limits, where),
                 None if image is None else photo(image, limits, where))
