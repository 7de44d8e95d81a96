"""What shoppers and the search engine see of a catalogue, drawn or real.

The behaviour simulator works on a `Market`: per-item facts as integer codes (leaf,
colour, brand, one searchable attribute, price band), a visual style vector, launch
times, the words people use for each code, and a way to fetch an item's catalogue
image. `from_world` builds it from the drawn catalogue; `from_items` from an ingested
real catalogue, measuring each item's visual style (its silhouette) and finish (sharpness)
from its real image; appeal and part of taste are hidden facts drawn per item, which only
behaviour reveals.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from moon import ui
from moon.io.images import decode
from moon.sources.simulate import vocab
from moon.sources.simulate.catalog import (
    COLOUR_NAMES,
    HIDDEN_TASTE_DIMS,
    SECONDS_PER_DAY,
    STYLE_DIMS,
    Catalog,
    item_id,
    look,
    unix_seconds,
)
from moon.sources.simulate.render import draw_item

SEARCHABLE_ATTRIBUTES = ("material", "usage", "season", "occasion", "finish")  # first present is used


@dataclass
class Market:
    item_ids: pa.Array  # string
    spu: np.ndarray  # int32
    leaf: np.ndarray  # int32
    group: np.ndarray  # int32: the leaf's parent category
    colour: np.ndarray  # int32, -1 when unknown
    brand: np.ndarray  # int32, -1 when unknown
    attr: np.ndarray  # int32: one attribute value a query may name, -1 when unknown
    gender: np.ndarray  # int32: gender word code, -1 when none
    price_band: np.ndarray  # int8 0..3, -1 when unknown
    style: np.ndarray  # float32 (n, d) in [-1, 1]
    finish: np.ndarray  # float32 in [-1, 1]: how well made the item looks, seen in its image (appeal)
    hidden_appeal: np.ndarray  # float32 in [-1, 1]: appeal no image or text shows
    hidden_taste: np.ndarray  # float32 (n, k): facts shoppers care about that no image or text shows
    created_at: np.ndarray  # int64 unix seconds
    leaf_words: list[list[str]]
    colour_words: list[list[str]]
    brand_words: list[str]
    attr_words: list[str]
    gender_words: list[list[str]]
    image: Callable[[int], Image.Image]  # the catalogue image of item i

    def __len__(self) -> int:
        return len(self.leaf)


def from_world(catalog: Catalog, image_size: int) -> Market:
    leaves = catalog.leaves
    gender_names = list(vocab.GENDER_WORDS)
    leaf_gender = np.array([gender_names.index(l.path[0]) if l.path[0] in gender_names else -1 for l in leaves])
    groups = sorted({leaf.path[:2] for leaf in leaves})
    leaf_group = np.array([groups.index(leaf.path[:2]) for leaf in leaves])
    # The searchable attribute is the family's first one (material, or connectivity, finish...).
    attr_words = sorted({v for values in vocab.ATTRIBUTES.values() for v in next(iter(values.values()))})
    first_values = [next(iter(vocab.ATTRIBUTES[leaf.family].values())) for leaf in leaves]
    attr = np.array([attr_words.index(first_values[l][a]) for l, a in zip(catalog.leaf, catalog.attrs[:, 0])])
    return Market(
        item_ids=pa.array(item_id(np.arange(len(catalog)))),
        spu=catalog.spu,
        leaf=catalog.leaf,
        group=leaf_group[catalog.leaf].astype(np.int32),
        colour=catalog.colour.astype(np.int32),
        brand=catalog.brand,
        attr=attr.astype(np.int32),
        gender=leaf_gender[catalog.leaf].astype(np.int32),
        price_band=catalog.price_band,
        style=catalog.style,
        finish=catalog.finish,
        hidden_appeal=catalog.hidden_appeal,
        hidden_taste=catalog.hidden_taste,
        created_at=catalog.created_at,
        leaf_words=[leaf.synonyms for leaf in leaves],
        colour_words=[vocab.COLOURS[name][1] for name in COLOUR_NAMES],
        brand_words=[brand.name.lower() for brand in catalog.brands],
        attr_words=attr_words,
        gender_words=[vocab.GENDER_WORDS[name] for name in gender_names],
        image=lambda i: draw_item(look(catalog, i), image_size),
    )


def from_items(items: pa.Table, new_item_share: float, start_date, days: int, seed: int) -> Market:
    """A market over a real catalogue. Items without a listing time get a simulated one."""
    rng = np.random.default_rng([seed, 9])
    category = items.column("category").to_pylist()
    attributes = [dict(a or []) for a in items.column("attributes").to_pylist()]
    titles = items.column("title").to_pylist()
    leaf, leaf_names = _codes([c[-1] for c in category])
    group, _ = _codes([" > ".join(c[:-1]) or c[-1] for c in category])
    colour, colour_names = _codes([a.get("colour", "").lower() for a in attributes])
    # Real titles lead with the brand (e.g. "Puma Men Blue Sports Shoes") when no brand attribute exists.
    brand, brand_names = _codes([(a.get("brand") or (t.split() or [""])[0]).lower() for a, t in zip(attributes, titles)])
    attr, attr_names = _codes([_searchable(a) for a in attributes])
    gender, gender_names = _codes([a.get("gender", "").lower() for a in attributes])
    spu, _ = _codes(items.column("spu_id").to_pylist())
    images = items.column("image")
    style, finish = measure_looks(images)
    n_spu = int(spu.max()) + 1 if len(spu) else 0
    return Market(
        item_ids=items.column("item_id").combine_chunks(),
        spu=spu,
        leaf=leaf,
        group=group,
        colour=colour,
        brand=brand,
        attr=attr,
        gender=gender,
        price_band=_price_bands(items.column("price").to_numpy(zero_copy_only=False), leaf),
        style=style,
        finish=finish,
        hidden_appeal=rng.uniform(-1, 1, len(spu)).astype(np.float32),
        hidden_taste=rng.standard_normal((n_spu, HIDDEN_TASTE_DIMS)).astype(np.float32)[spu],
        created_at=_launch_times(items, new_item_share, start_date, days, rng),
        leaf_words=[[name.lower()] for name in leaf_names],
        colour_words=[[name] for name in colour_names],
        brand_words=brand_names,
        attr_words=attr_names,
        gender_words=[[name] for name in gender_names],
        image=lambda i: decode(images[i].as_py()),
    )


def _codes(values: list[str]) -> tuple[np.ndarray, list[str]]:
    """Integer codes for values, -1 for empty ones, and the names of the codes."""
    names = sorted({v for v in values if v})
    lookup = {name: code for code, name in enumerate(names)}
    return np.array([lookup.get(v, -1) for v in values], dtype=np.int32), names


def _searchable(attributes: dict[str, str]) -> str:
    return next((attributes[k].lower() for k in SEARCHABLE_ATTRIBUTES if attributes.get(k)), "")


def _price_bands(price: np.ndarray, leaf: np.ndarray) -> np.ndarray:
    """Quartile of the price within its leaf category; -1 where the catalogue has no price."""
    bands = np.full(len(price), -1, dtype=np.int8)
    known = ~np.isnan(price.astype(float))
    for code in np.unique(leaf[known]):
        mask = known & (leaf == code)
        edges = np.quantile(price[mask], [0.25, 0.5, 0.75])
        bands[mask] = np.digitize(price[mask], edges)
    return bands


def _launch_times(items: pa.Table, new_item_share: float, start_date, days: int, rng) -> np.ndarray:
    start = unix_seconds(start_date)
    known = items.column("created_at").cast(pa.int64()).to_numpy(zero_copy_only=False)
    is_new = rng.random(len(known)) < new_item_share
    simulated = np.where(
        is_new,
        start + rng.random(len(known)) * days * SECONDS_PER_DAY,
        start - rng.random(len(known)) * 365 * SECONDS_PER_DAY - 1,
    ).astype(np.int64)
    has_time = ~pc.is_null(items.column("created_at")).to_numpy(zero_copy_only=False)
    return np.where(has_time, np.nan_to_num(known) // 1000, simulated).astype(np.int64)


def measure_looks(images: pa.ChunkedArray, side: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """What shoppers see in each real image, beyond what the baseline's colour/texture
    descriptor describes: a style vector from the product's silhouette (a fixed random
    projection of its coarse shape mask, standardised to [-1, 1]) and a finish from the
    image's sharpness (standardised to [-1, 1]). Colour, brightness and texture are left out on
    purpose: they are the baseline's own features, and a style made of them hands it the answer."""
    shapes = np.zeros((len(images), SHAPE_SIDE * SHAPE_SIDE), dtype=np.float32)
    sharpness = np.zeros(len(images), dtype=np.float32)
    with ui.progress("measure image looks", len(images), unit="images") as advance:
        for i, data in enumerate(images):
            shapes[i], sharpness[i] = _look_features(decode(data.as_py(), draft=(side, side)), side)
            advance()
    projection = np.random.default_rng(STYLE_PROJECTION_SEED).standard_normal((shapes.shape[1], STYLE_DIMS))
    style = _standardised(shapes @ projection.astype(np.float32))
    return style, _standardised(np.log1p(sharpness)[:, None])[:, 0]


SHAPE_SIDE = 8  # the silhouette mask a real item's style is projected from
STYLE_PROJECTION_SEED = 20261207  # fixed: the same image always has the same style


def _standardised(features: np.ndarray) -> np.ndarray:
    z = (features - features.mean(0)) / (features.std(0) + 1e-6)
    return np.tanh(z / 1.5).astype(np.float32)


def _look_features(image: Image.Image, side: int) -> tuple[np.ndarray, float]:
    """The product's coarse silhouette (share of product pixels per cell) and the image's
    sharpness (mean absolute Laplacian of the grey image)."""
    small = image.convert("RGB").resize((side, side))
    rgb = np.asarray(small, dtype=np.float32) / 255
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    product = (np.abs(rgb - np.median(border, axis=0)).sum(-1) > 0.15).astype(np.float32)
    cells = product.reshape(SHAPE_SIDE, side // SHAPE_SIDE, SHAPE_SIDE, side // SHAPE_SIDE).mean((1, 3))
    grey = rgb.mean(-1)
    laplacian = 4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
    return cells.ravel() - cells.mean(), float(np.abs(laplacian).mean())
