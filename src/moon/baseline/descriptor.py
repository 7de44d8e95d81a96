"""The baseline's image descriptor: colour and texture of the product in the middle of an image.

**Image part** (the last `IMAGE_DIMS` dimensions): the colour/texture descriptor. The
image's central square is resampled to `FULL` x `FULL` pixels (a JPEG is decoded at 1/2,
1/4 or 1/8 scale with `Image.draft` when that is still large enough). Products are
centred while a shopper's photo has clutter at its borders, so only the central `SIDE` x
`SIDE` pixels (70% of each side) are described. The median colour of the outer
`FRAME`-pixel frame estimates the background; a pixel's weight is a centred Gaussian
(standard deviation `SPREAD` x `SIDE`) times its foreground weight, which rises linearly
from `BACKGROUND_WEIGHT` to 1 as its largest RGB channel difference from the background
grows from `FOREGROUND_FROM` to `FOREGROUND_TO` levels; weights sum to 1 per image. This
keeps the colour of a thin product (a lamp, a necklace) from being drowned by the plain
catalogue background or the scene behind it. Four blocks, each a weighted histogram:

- hue x saturation: `HUE_BINS` circular hue bins by `SAT_BINS` saturation bins (HSV,
  saturation = (max - min) / max), bilinearly interpolated between bin centres, so a small
  change of light moves weight between neighbouring bins instead of jumping;
- value (brightness, the largest RGB channel): `VALUE_BINS` bins, linearly interpolated;
- gradient orientation: `ORIENTATION_BINS` circular bins of unsigned orientation (0-180
  degrees) of the grey-level central-difference gradient, each pixel voting its weight
  times its gradient magnitude, linearly interpolated;
- edge density: the weighted share d of pixels whose gradient magnitude exceeds
  `EDGE_THRESHOLD` grey levels per pixel, as the two-bin histogram (d, 1 - d).

The gradient blocks leave out the outermost described pixels (no full neighbourhood).
Each block is divided by its sum and square-rooted (the Hellinger map: the dot product of
two blocks is their Bhattacharyya coefficient), which gives it unit L2 norm, so the four
count equally; their concatenation is L2-normalised (a factor 1/2 unless an image is so
flat that it has no gradient at all).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moon import ui
from moon.io.images import central_square, decode
from moon.vectors import unit_rows

# Image part. The constants were chosen for photo -> item recall on simulated worlds.
FULL = 46  # side of the resampled image
SIDE = 32  # side of the described central region (70% of FULL)
FRAME = 2  # outer pixels whose median colour estimates the background
SPREAD = 0.3  # standard deviation of the centred Gaussian pixel weight, as a share of SIDE
BACKGROUND_WEIGHT = 0.05  # weight of a pixel of the background colour, relative to a foreground one
FOREGROUND_FROM, FOREGROUND_TO = 16.0, 80.0  # colour difference (levels) over which a pixel becomes foreground
HUE_BINS = 12
SAT_BINS = 6
VALUE_BINS = 8
ORIENTATION_BINS = 8
EDGE_THRESHOLD = 12.0  # gradient magnitude (grey levels per pixel) that counts as an edge
BLOCK_DIMS = {
    "hue_saturation": HUE_BINS * SAT_BINS,
    "value": VALUE_BINS,
    "orientation": ORIENTATION_BINS,
    "edge_density": 2,
}
IMAGE_DIMS = sum(BLOCK_DIMS.values())

BATCH = 4096  # images per numpy batch


def image_descriptors(images: Sequence[bytes], advance: ui.Advance | None = None) -> np.ndarray:
    """The colour/texture descriptor of each encoded image: (n, IMAGE_DIMS) float32, unit norm.
    `advance(n)` reports progress to the caller's bar."""
    out = np.empty((len(images), IMAGE_DIMS), dtype=np.float32)
    for start in range(0, len(images), BATCH):
        stop = min(start + BATCH, len(images))
        pixels = np.empty((stop - start, FULL, FULL, 3), dtype=np.uint8)
        for row in range(stop - start):
            pixels[row] = _decode_small(images[start + row], start + row)
        out[start:stop] = _describe(pixels)
        if advance:
            advance(stop - start)
    return out


def _decode_small(data: bytes, index: int) -> np.ndarray:
    """The image's central square as FULL x FULL RGB pixels."""
    try:
        square = central_square(decode(data, draft=(FULL, FULL)), FULL)
    except Exception as exc:  # decoders raise many types (OSError, SyntaxError, ValueError, ...)
        raise ValueError(f"image {index} cannot be decoded: {exc}") from exc
    return np.asarray(square)


def _centre_weights() -> np.ndarray:
    axis = (np.arange(SIDE, dtype=np.float32) + 0.5) / SIDE - 0.5
    squared = axis[:, None] ** 2 + axis[None, :] ** 2
    return np.exp(-squared / (2 * SPREAD**2)).astype(np.float32)


_CENTRE_WEIGHTS = _centre_weights()
_GREY = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601 luma, as PIL's "L"


def _describe(pixels: np.ndarray) -> np.ndarray:
    """Descriptors of a batch of (n, FULL, FULL, 3) uint8 RGB images."""
    n = len(pixels)
    margin = (FULL - SIDE) // 2
    rgb = pixels[:, margin : margin + SIDE, margin : margin + SIDE].astype(np.float32)
    weights = _pixel_weights(pixels, rgb)
    hue, saturation, value = _hsv(rgb)

    grey = rgb @ _GREY
    dx = (grey[:, 1:-1, 2:] - grey[:, 1:-1, :-2]) * 0.5
    dy = (grey[:, 2:, 1:-1] - grey[:, :-2, 1:-1]) * 0.5
    magnitude = np.sqrt(dx * dx + dy * dy).reshape(n, -1)
    orientation = np.arctan2(dy, dx).reshape(n, -1) % np.pi
    inner = weights[:, 1:-1, 1:-1].reshape(n, -1)
    edge = np.sum(inner * (magnitude > EDGE_THRESHOLD), axis=1) / np.maximum(inner.sum(axis=1), 1e-12)

    weights = weights.reshape(n, -1)
    blocks = [
        _joint_histogram(
            hue.reshape(n, -1) * HUE_BINS, HUE_BINS, saturation.reshape(n, -1) * SAT_BINS, SAT_BINS, weights
        ),
        _histogram(value.reshape(n, -1) * (VALUE_BINS / 256), VALUE_BINS, weights, circular=False),
        _histogram(orientation * (ORIENTATION_BINS / np.pi), ORIENTATION_BINS, inner * magnitude, circular=True),
        np.stack([edge, 1 - edge], axis=1),
    ]
    return unit_rows(np.concatenate([_hellinger(block) for block in blocks], axis=1).astype(np.float32))


def background_colour(pixels: np.ndarray) -> np.ndarray:
    """(n, 3) float RGB of a batch of (n, H, W, 3) images' backgrounds: their outer frame's median."""
    n = len(pixels)
    frame = np.concatenate(
        [
            pixels[:, :FRAME].reshape(n, -1, 3),
            pixels[:, -FRAME:].reshape(n, -1, 3),
            pixels[:, FRAME:-FRAME, :FRAME].reshape(n, -1, 3),
            pixels[:, FRAME:-FRAME, -FRAME:].reshape(n, -1, 3),
        ],
        axis=1,
    )
    return np.median(frame, axis=1).astype(np.float32)


def _pixel_weights(pixels: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """(n, SIDE, SIDE) weights summing to 1 per image: centred, and low on the background colour."""
    difference = np.abs(rgb - background_colour(pixels)[:, None, None, :]).max(axis=-1)
    foreground = np.clip((difference - FOREGROUND_FROM) / (FOREGROUND_TO - FOREGROUND_FROM), 0, 1)
    weights = _CENTRE_WEIGHTS * (BACKGROUND_WEIGHT + (1 - BACKGROUND_WEIGHT) * foreground)
    return weights / weights.sum(axis=(1, 2), keepdims=True)


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in [0, 1), saturation in [0, 1] and value in [0, 255] of float RGB pixels (as colorsys)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = rgb.max(axis=-1)
    chroma = value - rgb.min(axis=-1)
    saturation = chroma / np.maximum(value, 1e-6)
    safe = np.maximum(chroma, 1e-6)
    sector = np.where(value == r, (g - b) / safe, np.where(value == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = np.where(chroma > 0, (sector / 6) % 1.0, 0.0)
    return hue, saturation, value


def _interpolated(x: np.ndarray, bins: int, circular: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Values in bin units [0, bins) split between the two nearest bin centres: (low, high, high's share)."""
    position = x - 0.5
    low = np.floor(position)
    share = (position - low).astype(np.float32)
    low = low.astype(np.int64)
    if circular:
        return low % bins, (low + 1) % bins, share
    return np.clip(low, 0, bins - 1), np.clip(low + 1, 0, bins - 1), share


def _histogram(x: np.ndarray, bins: int, weights: np.ndarray, circular: bool) -> np.ndarray:
    """Per-row linearly interpolated histograms of x (n, pixels) in bin units."""
    n = len(x)
    low, high, share = _interpolated(x, bins, circular)
    offset = (np.arange(n) * bins)[:, None]
    votes = np.bincount((low + offset).ravel(), (weights * (1 - share)).ravel(), minlength=n * bins)
    votes += np.bincount((high + offset).ravel(), (weights * share).ravel(), minlength=n * bins)
    return votes.reshape(n, bins)


def _joint_histogram(a: np.ndarray, a_bins: int, b: np.ndarray, b_bins: int, weights: np.ndarray) -> np.ndarray:
    """Per-row bilinearly interpolated 2-D histograms, `a` circular (hue) and `b` linear (saturation)."""
    n = len(a)
    a_low, a_high, a_share = _interpolated(a, a_bins, circular=True)
    b_low, b_high, b_share = _interpolated(b, b_bins, circular=False)
    offset = (np.arange(n) * a_bins * b_bins)[:, None]
    votes = np.zeros(n * a_bins * b_bins)
    for a_bin, a_weight in ((a_low, 1 - a_share), (a_high, a_share)):
        for b_bin, b_weight in ((b_low, 1 - b_share), (b_high, b_share)):
            index = offset + a_bin * b_bins + b_bin
            votes += np.bincount(index.ravel(), (weights * a_weight * b_weight).ravel(), minlength=len(votes))
    return votes.reshape(n, a_bins * b_bins)


def _hellinger(histogram: np.ndarray) -> np.ndarray:
    return np.sqrt(histogram / np.maximum(histogram.sum(axis=1, keepdims=True), 1e-12))
