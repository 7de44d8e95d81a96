"""Shoppers' photos of products, the image queries of the simulated world.

A shopper photographs the product itself, not its catalogue image: the product is cut out
of its clean catalogue background and put into a cluttered scene (a room, a desk, a shop
shelf) among other products, at the size and place a phone photo has it (often a third to
two thirds of the frame, off-centre, sometimes twice), seen from another angle, lit by
other light (exposure, white balance, a coloured cast, a side light), partly covered (a
thumb, a strap), maybe blurred, and saved as a low-quality JPEG. All randomness comes from
the caller's generator, so a photo is reproducible from the generator's state.

The ranges below were set with the non-learned baseline alone, before any model was
trained on the photos: searching each shopper photo among its item and 80 random others
(`moon eval world`), its colour/texture descriptor should find the item about as often as
on real shop photos (R@1 about 0.05-0.15, R@10 about 0.35-0.50; real: 0.074 / 0.393).
With the product filling 80-110% of a centred frame and mild light, it reached 0.51 / 0.72.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

WORK_SIDE = 2  # a large input is first shrunk to about this multiple of the output size
LIGHT_SCENES = 0.6  # share of photos taken in front of a light wall, desk or bed
SHELF_SCENES = 0.25  # share taken in a shop, in front of shelves
PRODUCT_SCALE = (0.3, 0.75)  # the product's longer side, as a share of the photo's side
SECOND_INSTANCE = 0.15  # chance that two of the product are in the photo (a pair, a shop's stack)
OTHER_PRODUCT_SCALE = (0.25, 0.6)  # other products in the frame, as a share of the photo's side
SKIN = ((224, 172, 140), (198, 134, 98), (141, 85, 56), (240, 200, 175))  # thumbs over the product


def user_photo(image: Image.Image, rng: np.random.Generator, size: int, others: Sequence[Image.Image] = ()) -> bytes:
    """JPEG bytes of a size x size photo a shopper could take of the product in `image`;
    `others` are catalogue images of other products that stand in the scene around it."""
    photo = _background(rng, size)
    for other in others:  # behind the product: the shopper frames what they want
        _paste(photo, _place(_cut_out(_shrink(other.convert("RGB"), WORK_SIDE * size)), rng, size,
                             OTHER_PRODUCT_SCALE, anywhere=True))
    product = _cut_out(_shrink(image.convert("RGB"), WORK_SIDE * size))
    copies = 2 if rng.random() < SECOND_INSTANCE else 1
    alpha = np.zeros((size, size), dtype=np.float32)
    for copy in range(copies):
        placed = _place(product, rng, size, PRODUCT_SCALE, anywhere=copy > 0)
        alpha = np.maximum(alpha, _paste(photo, placed))
    _occlude(photo, alpha, rng)
    photo = _relight(photo, rng)
    result = Image.fromarray(photo.clip(0, 255, out=photo).astype(np.uint8), "RGB")
    if rng.random() < 0.5:  # hand shake or missed focus
        result = result.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.5)) * size / 96))
    buffer = io.BytesIO()
    result.save(buffer, format="JPEG", quality=int(rng.integers(20, 81)))
    return buffer.getvalue()


def _paste(photo: np.ndarray, placed: Image.Image) -> np.ndarray:
    """Composites an RGBA layer over the photo in place; returns the layer's coverage."""
    alpha = np.asarray(placed.getchannel("A"), dtype=np.float32) * (1 / 255)
    photo += (np.asarray(placed.convert("RGB"), dtype=np.float32) - photo) * alpha[..., None]
    return alpha


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


def _place(product: Image.Image, rng: np.random.Generator, size: int, scales: tuple[float, float],
           anywhere: bool = False) -> Image.Image:
    """The product framed by a shopper: scaled, tilted, seen at an angle (squeezed and sheared)
    and off-centre; mostly in frame, or `anywhere` (partly out of it) for what stands around."""
    alpha = np.asarray(product.getchannel("A"))
    rows, cols = np.flatnonzero(alpha.max(1) > 127), np.flatnonzero(alpha.max(0) > 127)
    if len(rows) == 0:  # nothing stands out from the background: photograph the whole image
        rows, cols = np.arange(product.height), np.arange(product.width)
    centre_x, centre_y = (cols[0] + cols[-1] + 1) / 2, (rows[0] + rows[-1] + 1) / 2
    extent = max(cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1)

    share = rng.uniform(*scales)
    scale = size * share / extent  # output pixels per input pixel
    angle = math.radians(rng.uniform(-30, 30))
    squeeze = math.exp(rng.uniform(-0.25, 0.25))  # a side view narrows the product, a top view shortens it
    shear = rng.uniform(-0.25, 0.25)
    reach = 0.6 if anywhere else max(0.5 - share / 2, 0.0) + 0.05  # how far the centre may stray from the middle
    out_x, out_y = size * (0.5 + rng.uniform(-reach, reach, 2))
    # PIL's affine maps each output pixel back to the input: undo rotation, shear and scale.
    cos, sin = math.cos(angle), math.sin(angle)
    forward = np.array([[cos, -sin], [sin, cos]]) @ np.array([[squeeze, shear], [0.0, 1 / squeeze]]) * scale
    (a, b), (d, e) = np.linalg.inv(forward)
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
    if rng.random() < SHELF_SCENES:
        _shelves(draw, rng, size)
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


def _shelves(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> None:
    """Shop shelves: boards across the frame, packed with boxes and bottles of every colour."""
    boards = np.sort(rng.uniform(0, 1, int(rng.integers(2, 4)))) * size
    board_colour = tuple(int(v) for v in _scene_colour(rng))
    for y in boards:
        x = rng.uniform(-0.1, 0) * size
        while x < size:
            w, h = rng.uniform(0.04, 0.14) * size, rng.uniform(0.08, 0.3) * size
            colour = tuple(int(v) for v in rng.uniform(20, 240, 3))
            draw.rectangle([x, y - h, x + w, y], fill=colour)
            x += w + rng.uniform(0, 0.03) * size
        draw.rectangle([0, y, size, y + max(2.0, 0.04 * size)], fill=board_colour)


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
    """Other light than the studio's: exposure, contrast, white balance, a coloured cast and a
    side light, as strong as indoor phone photos show (tungsten, shade, a shop's LEDs)."""
    size = photo.shape[0]
    temperature = rng.uniform(-1, 1)  # cold (blue) to warm (orange) white balance
    tint = rng.uniform(-1, 1)  # green to magenta
    balance = np.array([1 + 0.22 * temperature + 0.05 * tint, 1 - 0.1 * tint, 1 - 0.22 * temperature + 0.05 * tint],
                       dtype=np.float32)
    gain = float(np.exp(rng.uniform(-0.45, 0.35))) * balance
    contrast = rng.uniform(0.7, 1.25)
    mean = float(photo.mean())
    side = rng.uniform(-0.3, 0.3)
    axis = np.linspace(-1, 1, size, dtype=np.float32)
    light = 1 + side * (axis[None, :] if rng.random() < 0.5 else axis[:, None])
    photo = (photo - mean) * contrast + mean
    photo *= gain
    photo *= light[..., None]
    if rng.random() < 0.4:  # light reflected off a coloured wall or through a shop window
        photo += (rng.uniform(0, 255, 3).astype(np.float32) - photo) * rng.uniform(0.05, 0.2)
    noise = rng.standard_normal((size, size, 1), dtype=np.float32) * rng.uniform(1, 6)
    return photo + noise
