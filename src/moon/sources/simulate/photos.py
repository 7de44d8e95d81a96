"""Shoppers' photos of products, the image queries of the simulated world.

A shopper photographs the product itself, not its catalogue image: the product is cut
out of its clean catalogue background and put in front of a cluttered scene, framed,
tilted and lit differently, partly covered (a thumb, a strap), maybe blurred, and saved
as a low-quality JPEG. All randomness comes from the caller's generator, so a photo is
reproducible from the generator's state.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

WORK_SIDE = 2  # a large input is first shrunk to about this multiple of the output size
LIGHT_SCENES = 0.7  # share of photos taken in front of a light wall, desk or bed
PRODUCT_SCALE = (0.8, 1.1)  # the product's longer side, as a share of the photo's side
SKIN = ((224, 172, 140), (198, 134, 98), (141, 85, 56), (240, 200, 175))  # thumbs over the product


def user_photo(image: Image.Image, rng: np.random.Generator, size: int) -> bytes:
    """JPEG bytes of a size x size photo a shopper could take of the product in `image`."""
    product = _cut_out(_shrink(image.convert("RGB"), WORK_SIDE * size))
    placed = _place(product, rng, size)
    alpha = np.asarray(placed.getchannel("A"), dtype=np.float32) * (1 / 255)
    photo = _background(rng, size)
    photo += (np.asarray(placed.convert("RGB"), dtype=np.float32) - photo) * alpha[..., None]
    _occlude(photo, alpha, rng)
    photo = _relight(photo, rng)
    result = Image.fromarray(photo.clip(0, 255, out=photo).astype(np.uint8), "RGB")
    if rng.random() < 0.35:  # hand shake or missed focus
        result = result.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.1)) * size / 96))
    buffer = io.BytesIO()
    result.save(buffer, format="JPEG", quality=int(rng.integers(35, 86)))
    return buffer.getvalue()


def _shrink(image: Image.Image, side: int) -> Image.Image:
    """Real catalogue photos can be large; a few pixels per output pixel are enough."""
    if max(image.size) <= side:
        return image
    scale = side / max(image.size)
    shape = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(shape, Image.BILINEAR)


def _cut_out(image: Image.Image) -> Image.Image:
    """The product as RGBA: catalogue backgrounds are plain, so its colour is the border's
    median and the product is whatever differs from it, with a feathered edge.

    Gaps are closed so that the scene does not show through the product.
    """
    pixels = np.asarray(image, dtype=np.int16)
    border = np.concatenate([edge.reshape(-1, 3) for edge in (pixels[:2], pixels[-2:], pixels[:, :2], pixels[:, -2:])])
    background = np.median(border, axis=0).astype(np.int16)
    difference = np.abs(pixels - background)
    distance = np.maximum(np.maximum(difference[..., 0], difference[..., 1]), difference[..., 2])
    mask = np.clip((distance - 8) * 16, 0, 255).astype(np.uint8)
    # A white product differs only faintly from a white background: inside its outline,
    # any pixel that is not exactly the background belongs to it. Holes (a mug's handle)
    # show the background exactly and stay open.
    faint = _enclosed(mask > 127) & (distance > 2)
    mask[faint] = 255
    mask = _spread(_spread(mask, np.maximum, 1), np.minimum, 1)
    # One pixel in from the edge, so the catalogue background does not trace a halo around it.
    mask = Image.fromarray(_spread(mask, np.minimum, 1), "L").filter(ImageFilter.BoxBlur(0.7))
    product = image.copy()
    product.putalpha(mask)
    return product


def _enclosed(solid: np.ndarray) -> np.ndarray:
    """Pixels with `solid` ones to their left, right, top and bottom."""
    inside = np.logical_or.accumulate(solid, axis=1) & np.logical_or.accumulate(solid[:, ::-1], axis=1)[:, ::-1]
    inside &= np.logical_or.accumulate(solid, axis=0) & np.logical_or.accumulate(solid[::-1], axis=0)[::-1]
    return inside


def _spread(mask: np.ndarray, extreme, steps: int) -> np.ndarray:
    """Grows (np.maximum) or shrinks (np.minimum) a mask by `steps` pixels, 3x3 and separable."""
    for _ in range(steps):
        across = mask.copy()
        extreme(across[:, 1:], mask[:, :-1], out=across[:, 1:])
        extreme(across[:, :-1], mask[:, 1:], out=across[:, :-1])
        mask = across.copy()
        extreme(mask[1:], across[:-1], out=mask[1:])
        extreme(mask[:-1], across[1:], out=mask[:-1])
    return mask


def _place(product: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    """The product framed by a shopper: scaled, tilted and off-centre, mostly in frame."""
    alpha = np.asarray(product.getchannel("A"))
    rows, cols = np.flatnonzero(alpha.max(1) > 127), np.flatnonzero(alpha.max(0) > 127)
    if len(rows) == 0:  # nothing stands out from the background: photograph the whole image
        rows, cols = np.arange(product.height), np.arange(product.width)
    centre_x, centre_y = (cols[0] + cols[-1] + 1) / 2, (rows[0] + rows[-1] + 1) / 2
    extent = max(cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1)

    scale = size * rng.uniform(*PRODUCT_SCALE) / extent  # output pixels per input pixel
    angle = math.radians(rng.uniform(-25, 25))
    out_x, out_y = size * (0.5 + rng.uniform(-0.1, 0.1)), size * (0.5 + rng.uniform(-0.1, 0.1))
    # PIL's affine maps each output pixel back to the input: rotate by -angle, then unscale.
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    a, b, d, e = cos, sin, -sin, cos
    c = centre_x - a * out_x - b * out_y
    f = centre_y - d * out_x - e * out_y
    return product.transform((size, size), Image.AFFINE, (a, b, c, d, e, f), resample=Image.BILINEAR)


def _scene_colour(rng: np.random.Generator, light: bool = False) -> np.ndarray:
    """Colours of rooms and tables: greyish, often light, now and then a bright object."""
    grey = rng.uniform(215, 250) if light else rng.uniform(50, 230)
    saturation = rng.uniform(0.0, 0.2) if light or rng.random() < 0.85 else rng.uniform(0.4, 0.8)
    return np.clip(grey + (rng.uniform(0, 255, 3) - grey) * saturation, 0, 255).astype(np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A cluttered scene: a lit gradient, a table edge, a few objects, and texture.

    Most shoppers photograph on light walls, desks and beds, so most scenes are light.
    """
    light = rng.random() < LIGHT_SCENES
    top, bottom = _scene_colour(rng, light), _scene_colour(rng, light)
    direction = rng.uniform(0, 2 * math.pi)
    axis = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    ramp = 0.5 + axis[None, :] * math.cos(direction) + axis[:, None] * math.sin(direction)
    scene = top + (bottom - top) * ramp[..., None]
    if rng.random() < 0.6:  # the edge of a table or the floor
        edge = int(size * rng.uniform(0.4, 0.9))
        scene[edge:] = scene[edge:] * 0.3 + _scene_colour(rng, light) * 0.7

    canvas = Image.fromarray(scene.clip(0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 8))):
        colour = tuple(int(v) for v in _scene_colour(rng, light and rng.random() < 0.5))
        x, y = rng.uniform(-0.2, 1.2, 2) * size
        w, h = rng.uniform(0.06, 0.4, 2) * size
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse([x - w / 2, y - h / 2, x + w / 2, y + h / 2], fill=colour)
        elif kind == 1:
            draw.rectangle([x - w / 2, y - h / 2, x + w / 2, y + h / 2], fill=colour)
        else:
            x2, y2 = rng.uniform(-0.2, 1.2, 2) * size
            draw.line([x, y, x2, y2], fill=colour, width=max(1, int(w / 6)))

    # Coarse texture (fabric, wood grain, sensor noise), upsampled so that it stays cheap.
    coarse = size // 4 + 1
    grain = rng.standard_normal((coarse, coarse), dtype=np.float32) * rng.uniform(3, 10)
    grain = np.asarray(Image.fromarray(grain, "F").resize((size, size), Image.BILINEAR))
    return np.asarray(canvas, dtype=np.float32) + grain[..., None]


def _occlude(photo: np.ndarray, alpha: np.ndarray, rng: np.random.Generator) -> None:
    """Covers part of the product (a thumb or a strap), never more than about a quarter of it."""
    area = float(alpha.sum())
    if rng.random() < 0.2 or area < 4:
        return
    size = photo.shape[0]
    inside = np.flatnonzero(alpha.ravel() > 0.5)
    spot = inside[rng.integers(len(inside))] if len(inside) else size * size // 2
    cy, cx = divmod(int(spot), size)
    thumb = rng.random() < 0.6
    colour = np.array(SKIN[rng.integers(len(SKIN))] if thumb else _scene_colour(rng), dtype=np.float32)
    share = rng.uniform(0.06, 0.2)
    angle = rng.uniform(0, math.pi)
    for _ in range(3):  # shrink until the cover is small enough
        cover = _cover_mask(size, cx, cy, share * area, angle, thumb)
        covered = float((cover * alpha).sum()) / area
        if covered <= 0.22:  # a margin under a quarter: the blurred edge covers a little too
            break
        share *= 0.18 / covered
    else:
        return
    shade = colour * (0.85 + 0.15 * cover[..., None])  # the edge of a thumb is darker
    photo += (shade - photo) * cover[..., None]


def _cover_mask(size: int, cx: float, cy: float, area: float, angle: float, thumb: bool) -> np.ndarray:
    """Coverage in [0, 1] of a thumb (an elongated blob) or a strap (a bar across the photo)."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    cos, sin = math.cos(angle), math.sin(angle)
    if thumb:
        long = math.sqrt(area / math.pi * 1.8)
        short = long / 1.8
        t = np.linspace(0, 2 * math.pi, 20, endpoint=False)
        x, y = long * np.cos(t), short * np.sin(t)
        draw.polygon(np.stack([cx + x * cos - y * sin, cy + x * sin + y * cos], 1).ravel().tolist(), fill=255)
    else:
        width = max(2, int(area / size))
        draw.line([cx - cos * size, cy - sin * size, cx + cos * size, cy + sin * size], fill=255, width=width)
    return np.asarray(mask.filter(ImageFilter.BoxBlur(0.7)), dtype=np.float32) * (1 / 255)


def _relight(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Other light than the studio's: brightness, contrast, colour temperature, a side light.

    Kept moderate, as a phone's automatic exposure and white balance would.
    """
    size = photo.shape[0]
    temperature = rng.uniform(-1, 1)
    warmth = np.array([1 + 0.05 * temperature, 1 + 0.01 * temperature, 1 - 0.05 * temperature], dtype=np.float32)
    gain = rng.uniform(0.9, 1.12) * warmth
    contrast = rng.uniform(0.9, 1.1)
    mean = float(photo.mean())
    side = rng.uniform(-0.08, 0.08)
    axis = np.linspace(-1, 1, size, dtype=np.float32)
    light = 1 + side * (axis[None, :] if rng.random() < 0.5 else axis[:, None])
    photo = (photo - mean) * contrast + mean
    photo *= gain
    photo *= light[..., None]
    noise = rng.standard_normal((size, size, 1), dtype=np.float32) * rng.uniform(1, 3)
    return photo + noise
