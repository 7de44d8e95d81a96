"""Generic photo augmentation for image queries while post-training.

Shoppers' photos differ from catalogue images in framing, angle, light, sharpness,
compression and things in front of or around the product. The behaviour logs hold too
few photo queries to learn all of that, so image queries are augmented with the
standard recipe of self-supervised vision (random resized crop, rotation, flip, colour
jitter, blur, erasing, JPEG), and catalogue images become extra queries for their own
item ("catalogue self-pairs"). All randomness comes from the caller's generator, so a
resumed run sees the same augmented batches.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from moon.data.world.photos import decode_image

CROP_SCALE = (0.35, 1.0)  # share of the image area a random crop keeps
CROP_RATIO = (3 / 4, 4 / 3)
MAX_ROTATION = 25  # degrees either way
JITTER = 0.3  # brightness, contrast and saturation factors drawn from 1 +- this
ERASED_PATCHES = (0, 4)  # solid patches painted over the image: covers, clutter


def augment(image: bytes | Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    """A size x size random view of `image`, as a shopper's photo of it could look."""
    image = decode_image(image) if isinstance(image, (bytes, bytearray)) else image.convert("RGB")
    image = _resized_crop(image, rng, size)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image = image.rotate(rng.uniform(-MAX_ROTATION, MAX_ROTATION), Image.BILINEAR, fillcolor=_colour(rng))
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(rng.uniform(1 - JITTER, 1 + JITTER))
    _erase(image, rng)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.0) * size / 64))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(30, 90)))
    return decode_image(buffer.getvalue())


def _resized_crop(image: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    width, height = image.size
    area = width * height * rng.uniform(*CROP_SCALE)
    ratio = np.exp(rng.uniform(*np.log(CROP_RATIO)))
    w = int(min(width, round(np.sqrt(area * ratio))))
    h = int(min(height, round(np.sqrt(area / ratio))))
    x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    return image.resize((size, size), Image.BILINEAR, box=(x, y, x + w, y + h))


def _erase(image: Image.Image, rng: np.random.Generator) -> None:
    """Paints a few solid rectangles, each up to a fifth of the image, anywhere on it."""
    side = image.size[0]
    for _ in range(int(rng.integers(*ERASED_PATCHES, endpoint=True))):
        w, h = (np.sqrt(rng.uniform(0.02, 0.2)) * side * np.exp(rng.uniform(-0.5, 0.5, 2))).astype(int)
        x, y = rng.integers(-w // 2, side, endpoint=False), rng.integers(-h // 2, side, endpoint=False)
        image.paste(_colour(rng), (int(x), int(y), int(x + w), int(y + h)))


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))
