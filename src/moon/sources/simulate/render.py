"""Drawn catalogue images for the simulated world.

Every SKU is drawn from a `Look`: a silhouette family (one per leaf category, varied by
the leaf's proportions), a main colour with a pattern, a brand mark and four continuous
style axes. A catalogue image is a clean packshot: the product centred on a plain
near-white background, as marketplaces require.

Silhouettes are built from polygons and thick lines in their own units, fitted to the
frame, rasterised at twice the size for antialiasing and then composited with numpy at
the target size, which keeps drawing cheap enough for catalogues of a million items.
"""

from __future__ import annotations

import io
import math
import threading
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

PATTERNS: tuple[str, ...] = ("solid", "stripes", "dots", "checks", "zigzag", "gradient")
MARKS: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "bar", "ring", "cross")

BACKGROUND = np.array([247, 247, 245], dtype=np.float32)
FILL = 0.84  # share of the frame the product's longer side takes
SUPERSAMPLE = 2  # masks are drawn at this multiple of the size, then reduced (antialiasing)
CORNER_SAMPLES = 5  # points per rounded corner
WEIGHTS = ("background", "colour", "accent", "structure", "decoration", "outline", "halo", "mark")  # layers mixed
CORNER_T = np.linspace(0, 1, CORNER_SAMPLES)[None, :, None]


@dataclass(frozen=True)
class Look:
    """Everything that decides what an item looks like; see `draw_item`."""

    shape: str  # one of SHAPES
    proportions: tuple[float, float, float]  # in [0, 1]: width, height/length, detail size of the silhouette
    colour: tuple[int, int, int]
    pattern: str  # one of PATTERNS
    pattern_colour: tuple[int, int, int]
    mark: str  # one of MARKS
    mark_colour: tuple[int, int, int]
    style: tuple[float, float, float, float]  # roundness, boldness, tone, ornament, each in [-1, 1]
    seed: int  # small deterministic jitter: pattern phase and scale, mark position
    motif: int = -1  # a printed graphic on the body (a seed for its shape), or -1 for none
    finish: float = 0.0  # in [-1, 1]: faded and blotchy (-1) to crisp with a sheen (+1)


# ---------------------------------------------------------------- silhouettes


class Figure:
    """A silhouette in its own units (y grows downwards), with its details and brand-mark spot.

    Parts are painted in order, so a `cut` removes what earlier parts filled (a mug handle's
    hole). Details are lines and dots drawn inside the silhouette: `at=None` marks structure
    that is always there (laces, a watch's hands); a number in [0, 1) is the ornament level
    from which a decoration fades in (seams, buttons, trims).
    """

    def __init__(self) -> None:
        self.parts: list[tuple[bool, str, np.ndarray, float]] = []  # (filled, kind, points, width)
        self.details: list[tuple[str, np.ndarray, float, float | None]] = []  # (kind, points, width, at)
        self.mark = (0.0, 0.5, 0.08)  # centre x, y and radius of the brand mark

    def poly(self, points, cut: bool = False) -> None:
        self.parts.append((not cut, "poly", np.asarray(points, dtype=np.float64), 0.0))

    def mirrored(self, left, cut: bool = False) -> None:
        """A left-right symmetric polygon from its left half, listed from top to bottom."""
        left = np.asarray(left, dtype=np.float64)
        right = left[::-1] * (-1.0, 1.0)
        if abs(left[-1, 0]) < 1e-9:  # a point on the axis is listed once
            right = right[1:]
        if abs(left[0, 0]) < 1e-9:
            right = right[:-1]
        self.poly(np.vstack([left, right]), cut)

    def rect(self, x0, y0, x1, y1, cut: bool = False) -> None:
        self.poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], cut)

    def ellipse(self, cx, cy, rx, ry, angle: float = 0.0, cut: bool = False) -> None:
        # Already round: marked "smooth" so roundness does not touch it.
        self.parts.append((not cut, "smooth", _ellipse_points(cx, cy, rx, ry, angle), 0.0))

    def line(self, points, width: float, cut: bool = False) -> None:
        self.parts.append((not cut, "line", np.asarray(points, dtype=np.float64), width))

    def detail(self, points, width: float, at: float | None = None) -> None:
        self.details.append(("line", np.asarray(points, dtype=np.float64), width, at))

    def frame(self, x0, y0, x1, y1, width: float, at: float | None = None) -> None:
        """A rectangular detail outline (a pocket, a label, a screen's bezel)."""
        self.detail([(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)], width, at)

    def dot(self, cx, cy, r, at: float | None = None) -> None:
        self.details.append(("dot", _ellipse_points(cx, cy, r, r, 0.0, 12), 0.0, at))

    def freeze(self) -> None:
        """Centres the figure on (0, 0) with its longer side 1, and prepares corner rounding.

        Corner geometry (directions to the neighbouring vertices and how far a corner can
        be cut) is fixed per figure, so `rounded_polygons` only has to blend it.
        """
        boxes = np.array(
            [(*(pts.min(0) - width / 2), *(pts.max(0) + width / 2)) for filled, _, pts, width in self.parts if filled]
        )
        low, high = boxes[:, :2].min(0), boxes[:, 2:].max(0)
        centre, extent = (low + high) / 2, float((high - low).max())
        unit = lambda pts: (pts - centre) / extent  # noqa: E731
        self.parts = [(filled, kind, unit(pts), width / extent) for filled, kind, pts, width in self.parts]
        self.details = [(kind, unit(pts), width / extent, at) for kind, pts, width, at in self.details]
        mx, my, mr = self.mark
        self.mark = tuple(float(v) for v in (*unit(np.array([mx, my])), mr / extent))

        polygons = [pts for _, kind, pts, _ in self.parts if kind == "poly"]
        self._corners = np.vstack(polygons) if polygons else np.zeros((0, 2))
        ends = np.cumsum([len(p) for p in polygons])
        starts = ends - [len(p) for p in polygons]
        index = np.arange(len(self._corners))
        prev = np.concatenate([np.roll(np.arange(a, b), 1) for a, b in zip(starts, ends)] + [index[:0]])
        nxt = np.concatenate([np.roll(np.arange(a, b), -1) for a, b in zip(starts, ends)] + [index[:0]])
        to_prev, to_next = self._corners[prev] - self._corners[index], self._corners[nxt] - self._corners[index]
        len_prev = np.linalg.norm(to_prev, axis=1, keepdims=True) + 1e-12
        len_next = np.linalg.norm(to_next, axis=1, keepdims=True) + 1e-12
        self._to_prev, self._to_next = to_prev / len_prev, to_next / len_next
        self._max_cut = 0.45 * np.minimum(len_prev, len_next)  # two cuts never overlap on an edge
        self._slices = [slice(CORNER_SAMPLES * a, CORNER_SAMPLES * b) for a, b in zip(starts, ends)]

    def rounded_polygons(self, radius: float) -> list[np.ndarray]:
        """The "poly" parts with every corner replaced by a quadratic curve cutting `radius` in.

        The cut grows continuously with `radius`, so roundness changes the silhouette
        smoothly from sharp to soft.
        """
        cut = np.minimum(radius, self._max_cut)
        start, end = self._corners + self._to_prev * cut, self._corners + self._to_next * cut
        t = CORNER_T
        curve = (1 - t) ** 2 * start[:, None] + 2 * t * (1 - t) * self._corners[:, None] + t**2 * end[:, None]
        curve = curve.reshape(-1, 2)
        return [curve[s] for s in self._slices]


def _ellipse_points(cx, cy, rx, ry, angle: float, n: int = 32) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


def _arc(cx, cy, rx, ry, start: float, stop: float, n: int = 12) -> np.ndarray:
    """Points on an elliptic arc, angles in degrees (0 = right, 90 = down)."""
    t = np.radians(np.linspace(start, stop, n))
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _tshirt(f: Figure, a, b, c) -> None:
    w, length, sleeve, neck = 0.30 + 0.08 * a, 0.78 + 0.24 * b, 0.14 + 0.10 * c, 0.09 + 0.03 * c
    cuff = (-w - sleeve, 0.06 + 0.62 * sleeve)
    armpit = (cuff[0] + 0.10, cuff[1] + 0.13)
    f.mirrored([(0, 0), (-neck, -0.01), (-w, 0.05), cuff, armpit, (-w, 0.33), (-w, length), (0, length)])
    f.ellipse(0, -0.01, neck, 0.06 + 0.03 * c, cut=True)
    f.detail(_arc(0, -0.01, neck + 0.025, 0.085 + 0.03 * c, 10, 170), 0.02, at=0.1)  # neck rib
    f.detail([(-w + 0.02, length - 0.05), (w - 0.02, length - 0.05)], 0.015, at=0.3)  # hem
    for s in (-1, 1):
        f.detail([(s * (cuff[0] + 0.02), cuff[1] - 0.02), (s * (cuff[0] + 0.11), cuff[1] + 0.10)], 0.015, at=0.4)
    f.mark = (0.45 * w, 0.25, 0.07)


def _shirt(f: Figure, a, b, c) -> None:
    w, length, neck = 0.27 + 0.06 * a, 0.85 + 0.2 * b, 0.08
    cuff_x = -w - 0.08 - 0.04 * a  # slim sleeves hanging close to the body
    f.mirrored(
        [(0, 0.06), (-neck, -0.02), (-w, 0.05), (cuff_x, 0.72 * length), (cuff_x + 0.11, 0.74 * length),
         (-w + 0.01, 0.30), (-w, length - 0.08), (-0.12, length + 0.05), (0, length + 0.02)]  # curved tail
    )
    collar = 0.08 + 0.06 * c
    for s in (-1, 1):  # pointed collar tips over the neckline
        f.poly([(0, 0.07), (s * neck, -0.03), (s * (neck + 0.05), 0.0), (s * 0.06, 0.06 + collar)])
    f.detail([(0, 0.08), (0, length)], 0.012)  # placket
    for k in range(5):
        f.dot(0.025, 0.16 + k * (length - 0.22) / 4, 0.018, at=0.15 + 0.1 * k)
    for s in (-1, 1):
        f.detail([(s * (cuff_x + 0.01), 0.64 * length), (s * (cuff_x + 0.12), 0.66 * length)], 0.015, at=0.35)
    f.detail([(-w * 0.75, 0.22), (-w * 0.3, 0.22), (-w * 0.3, 0.34), (-w * 0.75, 0.34)], 0.012, at=0.55)  # pocket
    f.mark = (0.5 * w, 0.26, 0.06)


def _dress(f: Figure, a, b, c) -> None:
    hem, length, bodice = 0.30 + 0.18 * a, 0.95 + 0.25 * b, 0.13 + 0.04 * c
    waist = 0.38
    f.mirrored(
        [(0, 0.12), (-0.06, 0.08), (-bodice, 0.08), (-bodice - 0.02, 0.22), (-bodice + 0.02, waist),
         (-hem, length), (-hem * 0.5, length + 0.03), (0, length)]
    )
    for s in (-1, 1):
        f.line([(s * (bodice - 0.03), 0.1), (s * (bodice - 0.05), -0.05)], 0.03)  # straps
    f.detail([(-bodice + 0.02, waist), (bodice - 0.02, waist)], 0.03, at=0.1)  # belt
    f.detail(_arc(0, length - 0.05, hem * 0.95, 0.03, 180, 360), 0.018, at=0.35)  # hem trim
    for k in (-1, 0, 1):
        f.detail([(k * 0.04, waist + 0.02), (k * hem * 0.55, length - 0.02)], 0.01, at=0.6)  # folds
    f.mark = (0.0, 0.23, 0.06)


def _skirt(f: Figure, a, b, c) -> None:
    waist, hem, length = 0.24, 0.32 + 0.16 * a, 0.55 + 0.3 * b
    f.mirrored([(0, 0), (-waist, 0), (-waist, 0.08), (-hem, length), (-hem * 0.5, length + 0.02), (0, length)])
    f.detail([(-waist, 0.08), (waist, 0.08)], 0.015)  # waistband
    n = 3 + int(3 * c)
    for k in range(-n, n + 1):
        t = k / (n + 0.5)
        f.detail([(t * waist, 0.1), (t * hem, length - 0.02)], 0.01, at=0.2 + 0.05 * abs(k))  # pleats
    f.dot(0.0, 0.04, 0.02, at=0.5)
    f.mark = (waist * 0.5, 0.2, 0.06)


def _legwear(f: Figure, a, b, c, length: float, flare: float, gap: float) -> None:
    hip, crotch = 0.22 + 0.05 * a, 0.3
    hem = [(-hip - flare, length), (-gap - 0.5 * flare, length)]
    f.mirrored([(0, 0), (-hip + 0.01, 0), (-hip - 0.02, crotch - 0.02), *hem, (0, crotch)])
    f.detail([(-hip, 0.06), (hip, 0.06)], 0.015)  # waistband
    f.detail([(0.0, 0.07), (0.0, 0.26)], 0.012)  # fly
    for s in (-1, 1):
        pocket = [(s * hip * 0.95, 0.08), (s * hip * (0.5 - 0.15 * c), 0.1), (s * hip * 1.02, 0.22)]
        f.detail(pocket, 0.012, at=0.25)
        f.detail([(s * (hip * 0.55), 0.36), (s * (hip * 0.55 + flare * 0.5), length - 0.03)], 0.01, at=0.5)  # crease
        f.detail([(s * (hip + flare), length - 0.05), (s * (gap + 0.5 * flare), length - 0.05)], 0.012, at=0.65)  # hems
    f.mark = (-hip * 0.45, 0.15, 0.055)


def _trousers(f: Figure, a, b, c) -> None:
    _legwear(f, a, b, c, 0.95 + 0.25 * b, 0.02 + 0.04 * c, gap=0.1)


def _shorts(f: Figure, a, b, c) -> None:
    _legwear(f, a, b, c, 0.5 + 0.12 * b, 0.03 + 0.04 * c, gap=0.04)


def _jacket(f: Figure, a, b, c) -> None:
    w, length, neck = 0.33 + 0.06 * a, 1.0 + 0.3 * b, 0.08
    cuff_x = -w - 0.2  # padded shoulders, sleeves held away from the body
    f.mirrored(
        [(0, 0.45 - 0.1 * c), (-neck, 0.0), (-neck - 0.04, -0.1), (-w - 0.02, 0.02), (cuff_x, 0.75),
         (cuff_x + 0.12, 0.79), (-w + 0.02, 0.32), (-w - 0.06, length), (0, length)]
    )
    for s in (-1, 1):  # lapels
        f.detail([(s * neck, 0.0), (s * 0.12, 0.2), (s * 0.02, 0.40 - 0.1 * c)], 0.018)
        f.detail([(s * (w - 0.17), 0.62), (s * (w - 0.05), 0.62)], 0.02, at=0.25)  # pocket flaps
        f.detail([(s * (cuff_x + 0.01), 0.72), (s * (cuff_x + 0.13), 0.74)], 0.015, at=0.45)
    f.detail([(0, 0.40 - 0.1 * c), (0, length)], 0.012)
    for k in range(3):
        f.dot(-0.035, 0.48 + k * 0.14, 0.022, at=0.1 + 0.15 * k)
    f.mark = (0.55 * w, 0.3, 0.055)


def _sweater(f: Figure, a, b, c) -> None:
    w, length, neck = 0.30 + 0.07 * a, 0.75 + 0.2 * b, 0.10
    cuff = (-w - 0.42, 0.62)
    f.mirrored(
        [(0, 0.02), (-neck, 0.0), (-w + 0.02, 0.04), (cuff[0], cuff[1] - 0.04), (cuff[0] + 0.06, cuff[1] + 0.09),
         (-w, 0.38), (-w + 0.01, length - 0.1), (-w + 0.04, length), (0, length)]
    )
    f.ellipse(0, 0.0, neck, 0.05 + 0.02 * c, cut=True)
    f.detail(_arc(0, 0.0, neck + 0.03, 0.08 + 0.02 * c, 5, 175), 0.025)  # ribbed neck
    f.detail([(-w + 0.02, length - 0.1), (w - 0.02, length - 0.1)], 0.015)
    for s in (-1, 1):
        f.detail([(s * (cuff[0] + 0.05), cuff[1] - 0.05), (s * (cuff[0] + 0.12), cuff[1] + 0.07)], 0.015)
    for k in range(-3, 4):  # cable knit
        x = k * 0.07
        f.detail([(x, 0.2), (x + 0.03, 0.35), (x, 0.5), (x + 0.03, 0.65)], 0.012, at=0.2 + 0.05 * abs(k))
    f.mark = (0.0, 0.23, 0.07)


def _sneaker(f: Figure, a, b, c) -> None:
    h, sole = 0.26 + 0.1 * b, 0.06 + 0.04 * c
    top = 0.4 - h
    f.poly(
        [(-0.5, 0.4), (-0.49, top + 0.04), (-0.44, top), (-0.3, top + 0.06), (-0.18, top - 0.02), (-0.1, top),
         (0.22, 0.22 + 0.04 * a), (0.40, 0.27), (0.50, 0.34), (0.5, 0.4)]
    )
    f.poly([(-0.52, 0.38), (0.5, 0.38), (0.53, 0.38 + sole * 0.5), (0.48, 0.4 + sole), (-0.5, 0.4 + sole)])
    f.detail([(-0.5, 0.39), (0.5, 0.39)], 0.02)  # sole seam
    for k in range(4):
        x = -0.13 + 0.08 * k
        f.detail([(x - 0.02, top + 0.06 + 0.045 * k), (x + 0.04, top + 0.1 + 0.045 * k)], 0.018)  # laces
    f.detail(_arc(-0.05, 0.2, 0.28, 0.1, 200, 340), 0.02, at=0.2)  # side stripe
    f.detail([(0.32, 0.25), (0.48, 0.36)], 0.015, at=0.5)  # toe cap
    f.detail([(-0.47, top + 0.05), (-0.47, 0.36)], 0.04, at=0.3)  # heel tab
    for k in range(9):  # tread
        x, y = -0.44 + 0.11 * k, 0.4 + sole * 0.5
        f.detail([(x, y), (x + 0.04, y)], 0.02, at=0.45 + 0.03 * k)
    f.mark = (-0.32, 0.26, 0.06)


def _boot(f: Figure, a, b, c) -> None:
    shaft = 0.55 + 0.3 * b
    f.poly(
        [(-0.34, 0.9), (-0.33, 0.9 - shaft), (-0.02 - 0.04 * a, 0.9 - shaft), (0.0, 0.55), (0.28, 0.66),
         (0.40, 0.78), (0.40, 0.9)]
    )
    f.poly([(-0.36, 0.88), (0.42, 0.88), (0.42, 0.96), (-0.14, 0.96), (-0.16, 1.0 + 0.03 * c), (-0.36, 1.0 + 0.03 * c)])
    f.detail([(-0.36, 0.9), (0.42, 0.9)], 0.015)
    f.detail([(-0.33, 0.9 - shaft + 0.06), (-0.02, 0.9 - shaft + 0.06)], 0.02, at=0.2)  # cuff
    for k in range(4):
        f.dot(-0.02, 0.9 - shaft + 0.15 + 0.08 * k, 0.015, at=0.3 + 0.08 * k)  # eyelets
    f.detail([(0.02, 0.6), (0.24, 0.7), (0.34, 0.8)], 0.015, at=0.5)
    f.mark = (-0.18, 0.9 - shaft * 0.6, 0.06)


def _heel(f: Figure, a, b, c) -> None:
    ground, heel = 0.62, 0.2 + 0.1 * b  # heel: height of the heel seat above the ground
    seat = ground - heel
    vamp = 0.4 + 0.05 * a
    f.poly(
        [(-0.46, seat - 0.2), (-0.3, seat - 0.13), (-0.1, seat - 0.04), (0.08, vamp), (0.3, vamp + 0.06),
         (0.44, 0.54), (0.5, 0.59), (0.47, ground), (0.18, ground), (0.0, ground - 0.05), (-0.2, seat + 0.03),
         (-0.31, seat), (-0.35 + 0.01 * c, ground), (-0.38 - 0.01 * c, ground),  # the stiletto
         (-0.42, seat + 0.02), (-0.47, seat - 0.08)]
    )  # fmt: skip
    f.detail([(-0.44, seat - 0.16), (-0.3, seat - 0.1), (-0.1, seat - 0.01), (0.08, vamp + 0.03)], 0.015, at=0.2)
    f.dot(0.1, vamp + 0.03, 0.03 + 0.02 * c, at=0.45)  # bow
    f.detail([(0.18, ground - 0.015), (0.46, ground - 0.015)], 0.012, at=0.6)
    f.detail([(-0.33, seat + 0.02), (-0.365, ground - 0.01)], 0.025, at=0.3)  # contrasting heel
    for k in range(5):
        f.dot(-0.38 + 0.1 * k, seat - 0.1 + 0.03 * k + 0.02 * k * k / 4, 0.018, at=0.2 + 0.08 * k)  # studs
    f.mark = (-0.34, seat - 0.09, 0.045)


def _sandal(f: Figure, a, b, c) -> None:
    f.poly([(-0.5, 0.6), (0.42, 0.58), (0.5, 0.62), (0.46, 0.68), (-0.48, 0.68)])  # sole
    strap = 0.035 + 0.02 * c
    straps = [(0.22, 0.14, 0.16 + 0.06 * b), (-0.02, 0.13, 0.2 + 0.06 * b), (-0.32, 0.12 + 0.04 * a, 0.28 + 0.06 * b)]
    for k, (x, rx, ry) in enumerate(straps):
        f.line(_arc(x, 0.6, rx, ry, 180, 360), strap)
        f.dot(x, 0.6 - ry, 0.025, at=0.4)  # buckle
        for t in (210, 330):  # studs
            f.dot(x + rx * math.cos(math.radians(t)), 0.6 + ry * math.sin(math.radians(t)), 0.022, at=0.2 + 0.1 * k)
    f.detail([(-0.48, 0.64), (0.46, 0.63)], 0.012, at=0.2)
    f.mark = (-0.1, 0.64, 0.035)


def _handbag(f: Figure, a, b, c) -> None:
    w, top = 0.42 + 0.08 * a, 0.40 - 0.1 * b
    f.line(_arc(0, top + 0.02, 0.2 + 0.06 * c, 0.3 + 0.05 * b, 180, 360), 0.05)
    f.poly([(-w * 0.8, top), (w * 0.8, top), (w, 1.0), (-w, 1.0)])
    f.detail([(-w * 0.8, top + 0.02), (0, top + 0.22), (w * 0.8, top + 0.02)], 0.02, at=0.2)  # flap
    f.dot(0, top + 0.22, 0.03)  # clasp
    f.detail([(-w * 0.9, 0.93), (w * 0.9, 0.93)], 0.012, at=0.5)
    f.mark = (0.0, 0.72, 0.07)


def _backpack(f: Figure, a, b, c) -> None:
    w, h = 0.3 + 0.06 * a, 0.95 + 0.15 * b
    f.line(_arc(0, 0.12, 0.08, 0.1, 180, 360), 0.035)  # handle loop
    f.poly([(-w, 0.35), (-w * 0.8, 0.1), (w * 0.8, 0.1), (w, 0.35), (w, h), (-w, h)])
    for s in (-1, 1):  # side pockets
        out = s * (w + 0.06 + 0.03 * c)
        f.poly([(s * w, 0.55), (out, 0.58), (out, h - 0.05), (s * w, h - 0.05)])
    f.frame(-w * 0.7, 0.55, w * 0.7, h - 0.08, 0.018)  # front pocket
    f.detail([(-w * 0.8, 0.28), (w * 0.8, 0.28)], 0.015, at=0.25)  # zip
    f.dot(w * 0.6, 0.28, 0.022, at=0.35)
    f.detail([(-w * 0.7, 0.65), (w * 0.7, 0.65)], 0.012, at=0.5)
    f.mark = (0.0, 0.78, 0.07)


def _wallet(f: Figure, a, b, c) -> None:
    w, h = 0.5, 0.32 + 0.12 * b
    x = -0.4 + 0.1 * a
    f.rect(x, -0.07, x + 0.24, 0.05)  # a card peeking out
    f.rect(-w, 0, w, h * 2)
    f.detail([(-w, 0.02), (-w * 0.1, h * 0.9), (w * 0.1, h * 0.9), (w, 0.02)], 0.02, at=0.15)  # flap
    f.dot(0, h * 0.9, 0.03 + 0.02 * c)  # clasp
    f.detail([(-w + 0.04, 2 * h - 0.04), (w - 0.04, 2 * h - 0.04)], 0.012, at=0.5)
    f.mark = (w * 0.6, h * 1.45, 0.06)


def _watch(f: Figure, a, b, c) -> None:
    r, strap = 0.2 + 0.05 * a, 0.11 + 0.03 * b
    f.rect(-strap, 0.0, strap, 1.0)
    f.rect(0.05, 0.47, r + 0.05, 0.53)  # crown
    f.ellipse(0, 0.5, r, r)
    f.detail(_ellipse_points(0, 0.5, r - 0.035, r - 0.035, 0, 24)[list(range(24)) + [0]], 0.015)  # bezel
    f.detail([(0, 0.5), (0, 0.5 - r * 0.6)], 0.02)  # hands
    f.detail([(0, 0.5), (r * 0.45, 0.5 + r * 0.1)], 0.02)
    for k in range(12):
        t = k * np.pi / 6
        tick = [(q * r * np.cos(t), 0.5 + q * r * np.sin(t)) for q in (0.8, 0.68)]
        f.detail(tick, 0.012, at=0.1 + 0.03 * k)
    for k in range(3):
        f.dot(0, 0.85 + 0.05 * k, 0.015, at=0.4 + 0.1 * k)  # strap holes
    f.mark = (0.0, 0.5 + r * 0.45, 0.045 + 0.01 * c)


def _hat(f: Figure, a, b, c) -> None:
    brim, crown_h = 0.5, 0.3 + 0.15 * b
    f.ellipse(0, 0.62, brim, 0.08 + 0.05 * c)
    top = 0.6 - crown_h
    f.mirrored([(0, top + 0.04), (-0.08, top), (-0.22, top + 0.03), (-0.26 - 0.03 * a, 0.62), (0, 0.62)])  # crown
    f.detail([(-0.25 - 0.03 * a, 0.52), (0.25 + 0.03 * a, 0.52)], 0.05, at=0.1)  # band
    f.detail([(-0.24, 0.46), (0.24, 0.46)], 0.012, at=0.4)
    f.dot(0.16, 0.52, 0.03, at=0.6)
    f.mark = (-0.1, 0.38, 0.06)


def _cap(f: Figure, a, b, c) -> None:
    r = 0.32 + 0.04 * b
    dome = _arc(-0.05, 0.5, r, r * (0.85 + 0.2 * a), 180, 360, 20)
    f.poly(np.vstack([dome, [(-0.05 + r, 0.55), (-0.05 - r, 0.55)]]))
    f.poly([(0.15, 0.47), (0.58 + 0.08 * c, 0.52), (0.58 + 0.08 * c, 0.58), (0.15, 0.57)])  # visor
    f.ellipse(-0.05, 0.5 - r * (0.85 + 0.2 * a), 0.035, 0.02)  # button
    f.detail(_arc(-0.05, 0.5, r * 0.45, r * (0.85 + 0.2 * a), 200, 340), 0.012, at=0.2)  # panels
    f.detail(_arc(-0.05, 0.5, r * 0.02, r * (0.85 + 0.2 * a), 260, 280), 0.012, at=0.3)
    f.detail([(-0.05 - r, 0.52), (-0.05 + r, 0.52)], 0.015, at=0.45)
    f.mark = (-0.1, 0.38, 0.07)


def _scarf(f: Figure, a, b, c) -> None:
    w, length = 0.13 + 0.04 * a, 0.9 + 0.15 * b
    f.poly([(-0.02 - w, 0.05), (-0.02, 0.05), (0.02, length), (-0.04 - w, length)])
    f.poly([(0.02, 0.12), (0.04 + w, 0.12), (0.10 + w, length - 0.1), (0.08, length - 0.1)])
    f.ellipse(0.01, 0.08, w * 1.1, 0.08)  # knot
    for x in np.linspace(-0.04 - w, 0.02, 6):  # fringe
        f.line([(x, length), (x, length + 0.06 + 0.03 * c)], 0.012)
    for x in np.linspace(0.08, 0.1 + w, 5):
        f.line([(x, length - 0.1), (x, length - 0.04 + 0.03 * c)], 0.012)
    for y in (0.7, 0.76):
        f.detail([(-0.05 - w, y + 0.06), (0.03, y + 0.06)], 0.025, at=0.15)  # end stripes
        f.detail([(0.07, y - 0.06), (0.11 + w, y - 0.06)], 0.025, at=0.3)
    f.mark = (-0.02 - w * 0.5, 0.4, 0.05)


def _sunglasses(f: Figure, a, b, c) -> None:
    rx, ry, gap = 0.2 + 0.03 * a, 0.12 + 0.06 * b, 0.05
    for s in (-1, 1):
        cx = s * (gap + rx)
        f.poly(_ellipse_points(cx, 0.5, rx, ry, 0, 20))  # a polygon, not "smooth": roundness softens it
        temple = [(s * (gap + 2 * rx - 0.01), 0.5 - ry * 0.6), (s * (gap + 2 * rx + 0.1), 0.5 - ry * 0.8)]
        f.line(temple, 0.035)
        f.detail(_ellipse_points(cx, 0.5, rx - 0.035, ry - 0.035, 0, 20)[list(range(20)) + [0]], 0.02)  # rims
        f.detail([(cx - rx * 0.4, 0.5 - ry * 0.3), (cx - rx * 0.1, 0.5 - ry * 0.6)], 0.02, at=0.3)  # glint
        for k, t in enumerate((220, 250, 280, 310)):  # rhinestones along the top of the frame
            t = math.radians(t)
            f.dot(cx + (rx - 0.018) * math.cos(t), 0.5 + (ry - 0.018) * math.sin(t), 0.016, at=0.15 + 0.1 * k)
    f.line(_arc(0, 0.5 - ry * 0.4, gap + 0.02, 0.05 + 0.03 * c, 180, 360), 0.035)  # bridge
    f.mark = (gap + 2 * rx - 0.05, 0.5 - ry * 0.55, 0.035)


def _necklace(f: Figure, a, b, c) -> None:
    w, depth, bead = 0.34 + 0.08 * a, 0.5 + 0.15 * b, 0.045
    for t in np.linspace(-0.92, 0.92, 15):  # a U of beads, hanging from the top corners
        x, y = w * np.sin(t * np.pi / 2), depth * np.cos(t * np.pi / 2)
        f.ellipse(x, y, bead, bead)
        f.dot(x - bead * 0.2, y - bead * 0.2, bead * 0.4, at=0.1 + 0.5 * abs(t))  # facets catching the light
    pendant = 0.09 + 0.05 * c
    f.line([(0, depth), (0, depth + 0.06)], 0.025)
    top = depth + 0.04
    f.poly([(0, top), (pendant, top + pendant), (0, top + 2.4 * pendant), (-pendant, top + pendant)])
    f.detail([(0, depth + 0.08), (0, depth + 0.04 + 2.2 * pendant)], 0.015, at=0.3)
    f.detail([(-pendant * 0.6, top + pendant), (pendant * 0.6, top + pendant)], 0.015, at=0.5)
    f.mark = (0.0, depth + 0.04 + 1.1 * pendant, 0.045)


def _mug(f: Figure, a, b, c) -> None:
    w, h = 0.26 + 0.05 * a, 0.7 + 0.2 * b
    f.ellipse(w, 0.1 + h * 0.45, 0.16 + 0.04 * c, h * 0.28)  # handle
    f.ellipse(w, 0.1 + h * 0.45, 0.08 + 0.03 * c, h * 0.17, cut=True)
    f.poly([(-w, 0.1), (w, 0.1), (w * 0.95, 0.1 + h), (-w * 0.95, 0.1 + h)])
    f.detail([(-w, 0.15), (w, 0.15)], 0.02)  # rim
    f.detail([(-w * 0.95, 0.1 + h - 0.06), (w * 0.95, 0.1 + h - 0.06)], 0.015, at=0.3)
    f.detail([(-w * 0.9, 0.35), (w * 0.9, 0.35)], 0.03, at=0.5)
    f.mark = (-0.02, 0.1 + h * 0.55, 0.08)


def _bottle(f: Figure, a, b, c) -> None:
    w, neck = 0.17 + 0.05 * a, 0.06 + 0.02 * c
    shoulder = 0.3 + 0.1 * b
    cap = -neck - 0.015
    f.mirrored([(0, 0), (cap, 0), (cap, 0.1), (-neck, 0.12), (-neck, shoulder - 0.08), (-w, shoulder), (-w, 1), (0, 1)])
    f.detail([(-neck - 0.015, 0.1), (neck + 0.015, 0.1)], 0.015)  # cap line
    f.detail([(-w, 0.5), (w, 0.5)], 0.015, at=0.2)  # label
    f.detail([(-w, 0.82), (w, 0.82)], 0.015, at=0.2)
    for k in range(3):
        f.detail([(-neck + 0.02 * (k + 1), 0.02), (-neck + 0.02 * (k + 1), 0.09)], 0.01, at=0.5)
    f.mark = (0.0, 0.66, 0.07)


def _lamp(f: Figure, a, b, c) -> None:
    top, bottom, shade = 0.16 + 0.04 * a, 0.34 + 0.06 * a, 0.34 + 0.1 * b
    f.poly([(-top, 0), (top, 0), (bottom, shade), (-bottom, shade)])
    f.line([(0, shade), (0, 0.92)], 0.045)
    f.ellipse(0, 0.94, 0.2 + 0.06 * c, 0.05)
    f.detail([(-top - 0.01, 0.04), (top + 0.01, 0.04)], 0.02, at=0.2)
    f.detail([(-bottom + 0.01, shade - 0.04), (bottom - 0.01, shade - 0.04)], 0.02, at=0.2)
    f.dot(0.0, 0.8, 0.02, at=0.5)
    f.mark = (0.0, shade * 0.55, 0.07)


def _chair(f: Figure, a, b, c) -> None:
    w, back = 0.3 + 0.05 * a, 0.45 + 0.1 * b
    f.poly([(-w * 0.92, 0), (w * 0.92, 0), (w * 0.92, back), (-w * 0.92, back)])
    f.poly([(-w, back), (w, back), (w + 0.05, back + 0.12), (-w - 0.05, back + 0.12)])  # seat
    leg = 0.04 + 0.02 * c
    for s in (-1, 1):
        f.line([(s * (w + 0.02), back + 0.1), (s * (w + 0.05), 1.05)], leg)
        f.line([(s * (w - 0.08), back + 0.1), (s * (w - 0.1), 0.95)], leg * 0.8)
    for k in range(-2, 3):
        f.detail([(k * w * 0.3, 0.08), (k * w * 0.3, back - 0.04)], 0.015, at=0.2 + 0.05 * abs(k))  # slats
    f.detail([(-w * 0.9, back + 0.06), (w * 0.9, back + 0.06)], 0.012, at=0.45)
    f.mark = (0.0, back * 0.35, 0.07)


def _pillow(f: Figure, a, b, c) -> None:
    w, h, bow = 0.46, 0.36 + 0.1 * b, 0.04 + 0.05 * a
    t = np.linspace(-1, 1, 9)[:-1]
    sides = [
        np.stack([w * t, -h + bow * (1 - t**2)], 1),
        np.stack([w - bow * (1 - t**2), h * t], 1),
        np.stack([-w * t, h - bow * (1 - t**2)], 1),
        np.stack([-w + bow * (1 - t**2), -h * t], 1),
    ]
    f.poly(np.vstack(sides) + (0, 0.5))
    f.dot(0, 0.5, 0.03 + 0.02 * c, at=0.3)  # tuft
    f.detail(np.vstack(sides + [sides[0][:1]]) * 0.85 + (0, 0.5), 0.012, at=0.15)  # piping
    f.mark = (w * 0.45, 0.5 + h * 0.45, 0.07)


def _phone(f: Figure, a, b, c) -> None:
    w, h, r = 0.24 + 0.04 * a, 0.95 + 0.1 * b, 0.09
    corners = [_arc(x, y, r, r, start, start + 90, 6) for x, y, start in
               [(w - r, r, 270), (w - r, h - r, 0), (-w + r, h - r, 90), (-w + r, r, 180)]]  # fmt: skip
    f.poly(np.vstack(corners))  # phones are rounded whatever the style
    cam = 0.12 + 0.04 * c
    f.frame(-w + 0.05, 0.05, -w + 0.05 + cam, 0.05 + cam, 0.02)  # camera bump
    f.dot(-w + 0.05 + cam * 0.3, 0.05 + cam * 0.3, cam * 0.18)  # lenses
    f.dot(-w + 0.05 + cam * 0.3, 0.05 + cam * 0.72, cam * 0.18)
    f.detail([(-w + 0.03, h - 0.03), (w - 0.03, h - 0.03), (w - 0.03, 0.03)], 0.012, at=0.3)
    f.detail([(w * 0.3, h * 0.8), (w * 0.9, h * 0.8)], 0.015, at=0.55)
    f.mark = (0.0, h * 0.5, 0.07)


def _headphones(f: Figure, a, b, c) -> None:
    w, cup = 0.34 + 0.04 * a, 0.16 + 0.04 * c
    f.line(_arc(0, 0.58, w, 0.55 + 0.05 * b, 180, 360, 16), 0.07)
    for s in (-1, 1):
        f.ellipse(s * w, 0.66, cup * 0.7, cup)
        f.detail(_arc(s * w, 0.66, cup * 0.5, cup * 0.8, 0, 360, 16), 0.015, at=0.3)
    f.detail(_arc(0, 0.58, w, 0.55 + 0.05 * b, 240, 300, 8), 0.035, at=0.15)  # padding
    f.mark = (w, 0.66, 0.05)


def _laptop(f: Figure, a, b, c) -> None:
    w, h = 0.42 + 0.05 * a, 0.5 + 0.1 * b
    f.poly([(-w, 0), (w, 0), (w, h), (-w, h)])
    base = h + 0.06 + 0.02 * c
    f.poly([(-w - 0.02, h + 0.01), (w + 0.02, h + 0.01), (w + 0.09, base), (-w - 0.09, base)])
    f.frame(-w + 0.04, 0.04, w - 0.04, h - 0.04, 0.02)  # bezel
    f.detail([(-0.08, h + 0.045), (0.08, h + 0.045)], 0.015, at=0.2)  # trackpad
    f.dot(0, 0.02, 0.012, at=0.4)
    for k, (x, y, r) in enumerate([(-0.55, 0.3, 0.07), (0.5, 0.7, 0.09), (-0.3, 0.75, 0.05), (0.6, 0.25, 0.05)]):
        f.dot(x * w, y * h, r, at=0.2 + 0.15 * k)  # stickers on the lid
    f.mark = (0.0, h * 0.5, 0.07)


def _perfume(f: Figure, a, b, c) -> None:
    w, body = 0.3 + 0.06 * a, 0.55 + 0.1 * b
    f.rect(-0.1 - 0.04 * c, 0, 0.1 + 0.04 * c, 0.26)  # cap
    f.rect(-0.06, 0.25, 0.06, 0.36)
    f.poly([(-w, 0.36), (w, 0.36), (w, 0.36 + body), (-w, 0.36 + body)])
    f.frame(-w * 0.6, 0.5, w * 0.6, 0.36 + body * 0.8, 0.015, at=0.2)  # label
    f.detail([(-0.1, 0.08), (0.1, 0.08)], 0.012, at=0.45)
    f.mark = (0.0, 0.36 + body * 0.5, 0.07)


def _lipstick(f: Figure, a, b, c) -> None:
    w = 0.12 + 0.03 * a
    f.rect(-w, 0.5, w, 1.0)  # tube
    f.rect(-w * 0.85, 0.36, w * 0.85, 0.5)
    f.poly([(-w * 0.7, 0.36), (-w * 0.7, 0.12 + 0.05 * b), (w * 0.7, 0.0), (w * 0.7, 0.36)])  # bullet
    f.rect(w + 0.08, 0.4 - 0.1 * c, 2.6 * w + 0.08, 1.0)  # cap beside it
    f.detail([(-w, 0.56), (w, 0.56)], 0.015, at=0.2)
    f.detail([(w + 0.08, 0.5 - 0.1 * c), (2.6 * w + 0.08, 0.5 - 0.1 * c)], 0.015, at=0.4)
    f.mark = (0.0, 0.78, 0.06)


def _plush(f: Figure, a, b, c) -> None:
    head, body = 0.2 + 0.04 * a, 0.22 + 0.04 * b
    for s in (-1, 1):
        f.ellipse(s * head * 0.85, 0.1, 0.08 + 0.03 * c, 0.08 + 0.03 * c)  # ears
        f.ellipse(s * (body + 0.04), 0.6, 0.08, 0.15, angle=s * -30)  # arms
        f.ellipse(s * body * 0.6, 0.92, 0.12, 0.08)  # feet
    f.ellipse(0, 0.7, body, body * 1.1)
    f.ellipse(0, 0.3, head, head * 0.9)
    for s in (-1, 1):
        f.dot(s * head * 0.4, 0.25, 0.025)  # eyes
    f.dot(0, 0.35, 0.03)
    f.detail(_arc(0, 0.36, head * 0.45, head * 0.3, 0, 360, 16), 0.012, at=0.2)  # muzzle
    f.detail(_arc(0, 0.72, body * 0.6, body * 0.65, 0, 360, 16), 0.015, at=0.4)  # belly
    f.mark = (0.0, 0.72, 0.06)


SHAPE_BUILDERS = {
    "tshirt": _tshirt, "shirt": _shirt, "dress": _dress, "skirt": _skirt, "trousers": _trousers,
    "shorts": _shorts, "jacket": _jacket, "sweater": _sweater, "sneaker": _sneaker, "boot": _boot,
    "heel": _heel, "sandal": _sandal, "handbag": _handbag, "backpack": _backpack, "wallet": _wallet,
    "watch": _watch, "hat": _hat, "cap": _cap, "scarf": _scarf, "sunglasses": _sunglasses,
    "necklace": _necklace, "mug": _mug, "bottle": _bottle, "lamp": _lamp, "chair": _chair,
    "pillow": _pillow, "phone": _phone, "headphones": _headphones, "laptop": _laptop,
    "perfume": _perfume, "lipstick": _lipstick, "plush": _plush,
}  # fmt: skip
SHAPES: tuple[str, ...] = tuple(SHAPE_BUILDERS)


@lru_cache(maxsize=4096)
def _figure(shape: str, proportions: tuple[float, float, float]) -> Figure:
    """Silhouettes repeat across a leaf's items: built once per (shape, proportions)."""
    if shape not in SHAPE_BUILDERS:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    figure = Figure()
    SHAPE_BUILDERS[shape](figure, *(min(max(float(p), 0.0), 1.0) for p in proportions))
    figure.freeze()
    return figure


# ---------------------------------------------------------------- rasterising


def _draw(draw: ImageDraw.ImageDraw, kind: str, points: np.ndarray, width: float, fill: int, joint="curve") -> None:
    flat = points.ravel().tolist()
    if kind == "line":
        draw.line(flat, fill=fill, width=max(1, round(width)), joint=joint)
    else:
        draw.polygon(flat, fill=fill)


def _masks(figure: Figure, size: int, roundness: float, ornament: float, mark: str, mark_jitter, motif: int) -> tuple:
    """Coverage (uint8, 0-255, size x size) of the silhouette, its structure and decoration
    details (the printed motif among them), the brand mark and the mark's halo."""
    canvas = SUPERSAMPLE * size
    scale, offset = FILL * canvas, canvas / 2  # the figure is centred with its longer side 1
    polygons = iter(figure.rounded_polygons(roundness * 0.09 / FILL))

    silhouette = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(silhouette)
    for filled, kind, points, width in figure.parts:
        pts = (next(polygons) if kind == "poly" else points) * scale + offset
        _draw(draw, kind, pts, width * scale, 255 if filled else 0)
    silhouette = silhouette.reduce(SUPERSAMPLE)
    if roundness > 0:  # soft edges for soft styles
        silhouette = silhouette.filter(ImageFilter.BoxBlur(roundness * 0.7 * size / 96))

    # Structure (always there) and decorations (fading in with ornament) are drawn apart,
    # because decorations take the accent colour.
    structure, decoration = Image.new("L", (canvas, canvas), 0), Image.new("L", (canvas, canvas), 0)
    draws = ImageDraw.Draw(structure), ImageDraw.Draw(decoration)
    for kind, points, width, at in figure.details:
        alpha = 1.0 if at is None else min(max((ornament - at) * 4.0, 0.0), 1.0)
        if alpha > 0:
            draw = draws[at is not None]
            _draw(draw, kind, points * scale + offset, width * scale, round(255 * alpha), joint=None)
    if motif >= 0:
        draws[1].polygon(_motif_points(motif, canvas).ravel().tolist(), fill=255)

    # The mark sits on a halo that keeps it readable on a product of the same colour.
    mx, my, mr = figure.mark
    centre = (mx * scale + offset + mark_jitter[0] * canvas, my * scale + offset + mark_jitter[1] * canvas)
    mark_mask, halo_mask = _mark_masks(mark, centre, mr * scale, 1.2 * canvas / 96, size)
    structure, decoration = (np.asarray(im.reduce(SUPERSAMPLE)) for im in (structure, decoration))
    return np.asarray(silhouette), structure, decoration, mark_mask, halo_mask


def _motif_points(motif: int, canvas: int) -> np.ndarray:
    """A printed graphic near the body's centre: a star-like polygon whose corners, spikes and
    turn are the motif's own, a quarter to a third of the product's size."""
    rng = np.random.default_rng([motif, 11])
    corners = int(rng.integers(3, 8))
    angles = np.arange(2 * corners) * np.pi / corners + rng.uniform(0, np.pi)
    radii = np.where(np.arange(2 * corners) % 2 == 0, 1.0, rng.uniform(0.3, 0.9))
    radius = canvas * FILL * rng.uniform(0.12, 0.17)
    centre = canvas / 2 + canvas * FILL * rng.uniform(-0.06, 0.06, 2)
    return centre + radius * np.stack([np.cos(angles), np.sin(angles)], 1) * radii[:, None]


def _mark_masks(mark: str, centre, r: float, grow: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Coverage of the brand mark and of its halo; drawn on a small patch, as the mark is small."""
    reach = 1.5 * r + 2 * grow + 4
    spans = []  # the patch, in output pixels, on each axis
    for c in centre:
        low = min(max(int((c - reach) // SUPERSAMPLE), 0), size - 1)
        spans.append((low, min(max(math.ceil((c + reach) / SUPERSAMPLE), low + 1), size)))
    (x0, x1), (y0, y1) = spans
    patch = (SUPERSAMPLE * (x1 - x0), SUPERSAMPLE * (y1 - y0))
    inside = (centre[0] - SUPERSAMPLE * x0, centre[1] - SUPERSAMPLE * y0)
    layers = []
    for extra in (0.0, grow):
        image = Image.new("L", patch, 0)
        _draw_mark(ImageDraw.Draw(image), mark, inside, r, extra, 255)
        layer = np.zeros((size, size), dtype=np.uint8)
        layer[y0:y1, x0:x1] = np.asarray(image.reduce(SUPERSAMPLE))
        layers.append(layer)
    return layers[0], layers[1]


def _draw_mark(draw: ImageDraw.ImageDraw, mark: str, centre, r: float, grow: float, fill) -> None:
    """A brand mark of radius `r`, every edge pushed out by `grow` pixels."""
    cx, cy = centre
    g = grow
    if mark in ("circle", "ring"):
        box = [cx - r - g, cy - r - g, cx + r + g, cy + r + g]
        if mark == "circle":
            draw.ellipse(box, fill=fill)
        else:
            draw.ellipse(box, outline=fill, width=max(2, round(r * 0.4 + 2 * g)))
    elif mark in ("square", "bar", "cross"):
        half = {"square": [(0.85, 0.85)], "bar": [(1.3, 0.35)], "cross": [(1.0, 0.32), (0.32, 1.0)]}[mark]
        for hx, hy in half:
            draw.rectangle([cx - hx * r - g, cy - hy * r - g, cx + hx * r + g, cy + hy * r + g], fill=fill)
    else:
        if mark == "triangle":
            unit = [(0, -1), (0.95, 0.75), (-0.95, 0.75)]
            g *= 2  # a triangle's corners lie twice as far out as its edges
        elif mark == "diamond":
            unit = [(0, -1.1), (0.8, 0), (0, 1.1), (-0.8, 0)]
            g *= 1.5
        elif mark == "star":
            radii = [1 - 0.55 * (k % 2) for k in range(10)]  # alternating tips and notches
            unit = [(rad * math.sin(k * math.pi / 5), -rad * math.cos(k * math.pi / 5)) for k, rad in enumerate(radii)]
            g *= 2
        else:
            raise ValueError(f"unknown mark {mark!r}; expected one of {MARKS}")
        k = r + g
        draw.polygon([(cx + x * k, cy + y * k) for x, y in unit], fill=fill)


# ---------------------------------------------------------------- colour and pattern


LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _tone(rgb, tone: float) -> np.ndarray:
    """The same hue, pastel (desaturated and lighter) for tone < 0, vivid for tone > 0."""
    c = np.asarray(rgb, dtype=np.float32)
    grey = float(c @ LUMA)
    c = grey + (c - grey) * (1 + 0.55 * tone)
    if tone < 0:
        c = c + (255 - c) * (-0.4 * tone)
    return np.clip(c, 0, 255)


def _contrast(rgb: np.ndarray) -> np.ndarray:
    """A shade of the colour that stands out on it: darker on light colours, lighter on dark ones."""
    light = min(max((float(rgb @ LUMA) - 90) / 40, 0.0), 1.0)  # blended, so tone changes it smoothly
    return light * rgb * 0.55 + (1 - light) * (rgb + (255 - rgb) * 0.45)


@lru_cache(maxsize=16)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates relative to the frame centre."""
    axis = np.arange(size, dtype=np.float32) - (size - 1) / 2
    return axis[None, :].repeat(size, 0), axis[:, None].repeat(size, 1)


def _pattern(pattern: str, size: int, period: float, angle: float, phase: list[float]) -> np.ndarray | None:
    """Coverage in [0, 1] of the pattern colour, antialiased over about a pixel; None for solid."""
    if pattern == "solid":
        return None
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")
    x, y = _grid(size)
    cos, sin = math.cos(angle), math.sin(angle)
    along = x * cos + y * sin
    if pattern == "gradient":
        return np.clip(0.5 + along / (0.9 * size), 0, 1)
    u = along / period + phase[0]
    v = (y * cos - x * sin) / period + phase[1]
    sharp = period / (2 * math.pi)  # makes the edge about one pixel wide
    if pattern == "stripes":
        return np.clip(0.5 + sharp * np.sin(2 * np.pi * u), 0, 1)
    if pattern == "checks":
        return np.clip(0.5 + sharp * np.sin(2 * np.pi * u) * np.sin(2 * np.pi * v), 0, 1)
    if pattern == "zigzag":
        tri = np.abs(u - np.floor(u) - 0.5)
        return np.clip(0.5 + sharp * np.sin(2 * np.pi * (v + 0.7 * tri)), 0, 1)
    # dots on a staggered lattice
    u = u + 0.5 * (np.floor(v) % 2)
    du, dv = u - np.round(u), v - np.round(v)
    distance = np.sqrt(du * du + dv * dv) * period
    return np.clip(0.28 * period - distance + 0.5, 0, 1)


_local = threading.local()


def _weights_buffer(size: int) -> np.ndarray:
    """Scratch space for the colour weights, reused per thread: allocating it anew costs
    as much as filling it."""
    buffer = getattr(_local, "weights", None)
    if buffer is None or buffer.shape[1] != size:
        buffer = _local.weights = np.empty((len(WEIGHTS), size, size), dtype=np.float32)
    return buffer


@lru_cache(maxsize=16)
def _light(size: int) -> np.ndarray:
    """Shading direction: +1 at the top-left corner down to -1 at the bottom-right."""
    x, y = _grid(size)
    return -(x + y) / size


@lru_cache(maxsize=16)
def _dashes(size: int) -> np.ndarray:
    """On-off dashes along the diagonals, for stitching."""
    x, y = _grid(size)
    return ((x + y) % 4 < 2).astype(np.float32)


def _erosions(mask: np.ndarray, wanted: set[int]) -> dict[int, np.ndarray]:
    """The mask eroded by each wanted number of pixels (3x3 minimum, separable; any dtype).

    Only the box around the nonzero pixels, plus a margin, is worked on: outside it every
    erosion is zero anyway.
    """
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if len(rows) == 0:
        return dict.fromkeys(wanted, mask)
    box = (slice(max(rows[0] - 1, 0), rows[-1] + 2), slice(max(cols[0] - 1, 0), cols[-1] + 2))
    out = {0: mask}
    m = mask[box]
    for step in range(1, max(wanted) + 1):
        h = m.copy()
        np.minimum(h[:, 1:], m[:, :-1], out=h[:, 1:])
        np.minimum(h[:, :-1], m[:, 1:], out=h[:, :-1])
        m = h.copy()
        np.minimum(m[1:], h[:-1], out=m[1:])
        np.minimum(m[:-1], h[1:], out=m[:-1])
        if step in wanted:
            out[step] = np.zeros_like(mask)
            out[step][box] = m
    return out


# ---------------------------------------------------------------- the image


def draw_item(look: Look, size: int) -> Image.Image:
    """The catalogue image of an item: an RGB size x size packshot on near-white.

    Style axes (each in [-1, 1]) change the drawing continuously: roundness rounds the
    silhouette's corners and softens its edge; boldness thickens and darkens the outline and
    raises the pattern's and shading's contrast; tone moves the colours from pastel to
    vivid without changing their hue; ornament fades in seams, trims and buttons, adds
    stitching and makes the pattern finer. A motif is printed on the body in the accent
    colour; finish goes from faded and blotchy to crisp with a sheen.
    """
    roundness, boldness, tone, ornament = ((min(max(float(s), -1.0), 1.0) + 1) / 2 for s in look.style)
    # Python floats, so that no numpy float64 scalar promotes the float32 arrays.
    jitter = np.random.default_rng(look.seed).random(6).tolist()
    figure = _figure(look.shape, tuple(look.proportions))
    masks = _masks(figure, size, roundness, ornament, look.mark, [(j - 0.5) * 0.03 for j in jitter[4:6]], look.motif)

    # Outline: the band between the silhouette and its erosion by a non-integer width;
    # stitching: a dashed band just inside the widest outline.
    width = (0.4 + 2.6 * boldness) * size / 96
    low, frac = int(width), width - int(width)
    stitch_at = int(3 * size / 96) + 2
    stitch = min(max((ornament - 0.3) * 3, 0), 1)
    eroded = _erosions(masks[0], {low, low + 1, stitch_at, stitch_at + 1} if stitch > 0 else {low, low + 1})
    to_float = lambda m: m.astype(np.float32) * (1 / 255)  # noqa: E731
    silhouette, structure, decoration, mark, halo = (to_float(m) for m in masks)
    inner = to_float(eroded[low]) * (1 - frac) + to_float(eroded[low + 1]) * frac
    outline = (silhouette - inner) * (0.45 + 0.55 * boldness)
    structure *= silhouette
    decoration *= silhouette
    if stitch > 0:
        ring = to_float(eroded[stitch_at]) - to_float(eroded[stitch_at + 1])
        decoration = np.clip(decoration + ring * _dashes(size) * stitch, 0, 1)

    colour = _tone(look.colour, 2 * tone - 1)
    accent = _tone(look.pattern_colour, 2 * tone - 1)
    period = size * (0.2 - 0.1 * ornament) * (0.85 + 0.3 * jitter[0])
    angle = (np.pi / 4) * (jitter[1] * 4 // 1) + (jitter[1] * 4 % 1 - 0.5) * 0.3
    coverage = _pattern(look.pattern, size, period, angle, jitter[2:4])
    share = 0 if coverage is None else (0.6 + 0.4 * boldness) * coverage

    # The image is a per-pixel mix of a few colours, so it is composed as weights @ colours:
    # product over background, details and outline over the fill, then the mark on its halo.
    halo -= mark
    visible = (1 - halo - mark) * silhouette
    drawn = visible * (1 - outline)
    body = drawn * (1 - structure) * (1 - decoration) * (1 + (0.05 + 0.1 * boldness) * _light(size))
    weights = np.stack(
        [
            (1 - halo - mark) * (1 - silhouette),
            body * (1 - share),
            body * share,
            drawn * structure * (1 - decoration),
            drawn * decoration,
            visible * outline,
            halo,
            mark,
        ],
        out=_weights_buffer(size),
    ).reshape(len(WEIGHTS), -1)
    mark_colour = np.asarray(look.mark_colour, dtype=np.float32)
    halo_colour = 30.0 if float(mark_colour @ LUMA) >= 140 else 255.0
    # Decorations take the accent colour, unless it is too close to the main colour to show.
    apart = min(float(np.abs(accent - colour).max()) / 80, 1.0)
    colours = np.stack(
        [
            BACKGROUND,
            colour,
            accent,
            _contrast(colour),
            apart * accent + (1 - apart) * _contrast(colour),
            colour * (0.6 - 0.45 * boldness),
            np.full(3, halo_colour, dtype=np.float32),
            mark_colour,
        ]
    )
    image = (weights.T @ colours).reshape(size, size, 3)
    image = _finish(image, silhouette, look.finish, look.seed) + 0.5
    return Image.fromarray(image.clip(0, 255, out=image).astype(np.uint8), "RGB")


def _finish(image: np.ndarray, silhouette: np.ndarray, finish: float, seed: int) -> np.ndarray:
    """How well made the product looks: a sheen on a crisp one (finish > 0), faded colour
    with blotches on a poor one (finish < 0). Shoppers see it; nothing in the catalogue's
    text or facts says it."""
    size = image.shape[0]
    cover = silhouette[..., None]
    if finish > 0:
        x, y = _grid(size)
        spot = np.exp(-((x + 0.15 * size) ** 2 + (y + 0.18 * size) ** 2) / (2 * (0.2 * size) ** 2))
        return image + (255 - image) * (0.55 * finish * spot)[..., None] * cover
    if finish < 0:
        coarse = np.random.default_rng([seed, 12]).standard_normal((6, 6)).astype(np.float32)
        blotches = np.asarray(Image.fromarray(coarse, "F").resize((size, size), Image.BICUBIC))
        grey = image @ LUMA
        faded = image + (grey[..., None] + 25 - image) * (0.45 * -finish)
        faded *= 1 + (0.16 * -finish) * blotches[..., None]
        return image + (faded - image) * cover
    return image


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)  # nearly as small as the default, much faster
    return buffer.getvalue()
