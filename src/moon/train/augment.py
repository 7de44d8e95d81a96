"""Generic photo augmentation for image queries while post-training.

Shoppers' photos differ from catalogue images in framing, angle, light, sharpness,
compression and things in front of or around the product. The behaviour logs hold too
few photo queries to learn all of that, so image queries are augmented with the
standard recipe of self-supervised vision (random resized crop, rotation, flip, colour
jitter, blur, erasing, JPEG), and catalogue images become extra queries for their own
item ("catalogue self-pairs").

Catalogue images show the product on a plain background, shoppers' photos in front of a
room. So, given `scenes` (encoded photos: the shoppers' photos of the training pairs),
most catalogue images are re-staged first ("copy-paste" augmentation): the product is
cut out of its plain background and pasted, small, tilted and anywhere in the frame,
onto a random zoomed-in crop of a scene. All randomness comes from the caller's generator, so
a resumed run sees the same augmented batches.

Every view starts from the same few thousand catalogue images and scenes, so each process
keeps them decoded, and the products cut out, for the next time (`CACHED_IMAGES` of each).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from moon.baseline.descriptor import background_colour
from moon.io.images import decode

CROP_SCALE = (0.35, 1.0)  # share of the image area a random crop keeps
CROP_RATIO = (3 / 4, 4 / 3)
MAX_ROTATION = 25  # degrees either way
JITTER = 0.3  # brightness, contrast and saturation factors drawn from 1 +- this
ERASED_PATCHES = (0, 4)  # solid patches painted over the image: covers, clutter

RESTAGED = 0.8  # share of catalogue images pasted onto a scene, when scenes are given
# Shoppers photograph the product small and anywhere in the frame (a third to three quarters of
# its side, docs/world.md), not filling it as a catalogue image does.
PRODUCT_SCALE = (0.3, 0.8)  # the pasted product's longer side, as a share of the image side
SLACK = 0.05  # how far past the frame's edge the product's centre may stray, as a share of the side
SCENE_ZOOM = (0.3, 0.8)  # side of the scene crop, as a share of the scene's side
BACKGROUND_FROM, BACKGROUND_TO = 12.0, 48.0  # colour difference (levels) over which a pixel becomes product
PLAIN_BACKGROUND = (0.02, 0.9)  # product share of the image for a cut-out to be trusted
WORK_SIDE = 4  # a catalogue image is cut out at no more than this multiple of the output side
CACHED_IMAGES = 4096  # decoded images and cut-outs kept per process (each a few hundred KiB at most)


def augment(image: bytes | Image.Image, rng: np.random.Generator, size: int,
            scenes: Sequence[bytes] = ()) -> Image.Image:
    """A size x size random view of `image`, as a shopper's photo of it could look."""
    staged = _restage(image, rng, size, scenes) if len(scenes) and rng.random() < RESTAGED else None
    image = staged if staged is not None else _resized_crop(_decoded(image), rng, size)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if staged is None:  # a staged product is tilted already, in front of a whole scene
        image = image.rotate(rng.uniform(-MAX_ROTATION, MAX_ROTATION), Image.BILINEAR, fillcolor=_colour(rng))
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(rng.uniform(1 - JITTER, 1 + JITTER))
    _erase(image, rng)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.0) * size / 64))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(30, 90)))
    return decode(buffer.getvalue())


def _resized_crop(image: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    width, height = image.size
    area = width * height * rng.uniform(*CROP_SCALE)
    ratio = np.exp(rng.uniform(*np.log(CROP_RATIO)))
    w = int(min(width, round(np.sqrt(area * ratio))))
    h = int(min(height, round(np.sqrt(area / ratio))))
    x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    return image.resize((size, size), Image.BILINEAR, box=(x, y, x + w, y + h))


def _restage(image: bytes | Image.Image, rng: np.random.Generator, size: int,
             scenes: Sequence[bytes]) -> Image.Image | None:
    """The product of a plain-background image pasted onto a scene; None if it has no plain background."""
    product = _product(image, WORK_SIDE * size)
    if product is None:
        return None
    scene = _scene_crop(_decoded(scenes[int(rng.integers(len(scenes)))]), rng, size)
    share = rng.uniform(*PRODUCT_SCALE)
    scale = size * share / max(product.size)
    product = product.resize((max(1, round(product.width * scale)), max(1, round(product.height * scale))),
                             Image.BILINEAR)
    product = product.rotate(rng.uniform(-MAX_ROTATION, MAX_ROTATION), Image.BILINEAR, expand=True)
    reach = max(0.5 - share / 2, 0.0) + SLACK  # anywhere the product still mostly fits in the frame
    corner = size * (0.5 + rng.uniform(-reach, reach, 2)) - np.array(product.size) / 2
    scene.paste(product, tuple(int(c) for c in corner), product)
    return scene


def _decoded(image: bytes | Image.Image) -> Image.Image:
    """The image decoded, from this process's cache when it is encoded bytes: never change it."""
    return _decode_once(image) if isinstance(image, bytes) else decode(image)


@lru_cache(CACHED_IMAGES)
def _decode_once(data: bytes) -> Image.Image:
    return decode(data)


def _product(image: bytes | Image.Image, side: int) -> Image.Image | None:
    """The product cut out of the image at no more than side x side pixels (cached like `_decoded`)."""
    return _cut_out_once(image, side) if isinstance(image, bytes) else _cut_out_at(image, side)


@lru_cache(CACHED_IMAGES)
def _cut_out_once(data: bytes, side: int) -> Image.Image | None:
    return _cut_out_at(_decoded(data), side)


def _cut_out_at(image: Image.Image, side: int) -> Image.Image | None:
    image = image.copy()
    image.thumbnail((side, side))  # cut large catalogue photos at a few pixels per output pixel
    return cut_out(image)


def cut_out(image: Image.Image) -> Image.Image | None:
    """The product as RGBA, cropped to it: whatever differs from the background colour the baseline sees.

    None when the image has no plain background to cut along (too little or too much of it
    differs from the border).
    """
    pixels = np.asarray(image, dtype=np.float32)
    difference = np.abs(pixels - background_colour(pixels[None])[0]).max(axis=-1)
    alpha = np.clip((difference - BACKGROUND_FROM) / (BACKGROUND_TO - BACKGROUND_FROM), 0, 1)
    if not PLAIN_BACKGROUND[0] <= alpha.mean() <= PLAIN_BACKGROUND[1]:
        return None
    # Close pinholes where the product's colour touches the background's, then feather the edge.
    mask = Image.fromarray((alpha * 255).astype(np.uint8), "L").filter(ImageFilter.MaxFilter(3))
    mask = mask.filter(ImageFilter.MinFilter(3)).filter(ImageFilter.GaussianBlur(0.6))
    product = image.copy()
    product.putalpha(mask)
    return product.crop(mask.getbbox())


def _scene_crop(scene: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    """A random square zoomed into a scene, size x size: a stretch of room behind the product."""
    side = min(scene.size) * rng.uniform(*SCENE_ZOOM)
    x, y = rng.uniform(0, scene.width - side), rng.uniform(0, scene.height - side)
    return scene.resize((size, size), Image.BILINEAR, box=(x, y, x + side, y + side))


def _erase(image: Image.Image, rng: np.random.Generator) -> None:
    """Paints a few solid rectangles, each up to a fifth of the image, anywhere on it."""
    side = image.size[0]
    for _ in range(int(rng.integers(*ERASED_PATCHES, endpoint=True))):
        w, h = (np.sqrt(rng.uniform(0.02, 0.2)) * side * np.exp(rng.uniform(-0.5, 0.5, 2))).astype(int)
        x, y = rng.integers(-w // 2, side, endpoint=False), rng.integers(-h // 2, side, endpoint=False)
        image.paste(_colour(rng), (int(x), int(y), int(x + w), int(y + h)))


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))
