"""The simulated catalogue: category tree, brands, shops, SPUs with SKU variants, titles and images.

`build_catalog` draws every item's facts as compact numpy arrays (cheap even for a
million items); `items_table` turns a slice of them into rows of the `items` table,
composing titles and drawing images only for that slice, so a large world streams in
chunks with bounded memory. Both are pure functions of the config and seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain, zip_longest

import numpy as np
import pyarrow as pa

from moon.config import BehaviourConfig, WorldConfig
from moon.io import schema
from moon.sources.simulate import vocab
from moon.sources.simulate.render import MARKS, PATTERNS, Look, draw_item, encode_png

COLOUR_NAMES = list(vocab.COLOURS)
STYLE_DIMS = 4  # roundness, boldness, tone, ornament (see render.Look.style)
PATTERN_WEIGHTS = np.array([0.4] + [0.6 / (len(PATTERNS) - 1)] * (len(PATTERNS) - 1))
BRAND_TIER_PRICE = np.array([0.6, 1.0, 1.8, 3.5])  # budget, mid, premium, luxury
PRICE_BAND_EDGES = np.array([0.8, 1.3, 2.2])  # price / leaf base price -> band 0..3
# How often each colour is a product's, in the order of vocab.COLOURS. Shops sell mostly black,
# white, grey, navy and beige, so many items of a leaf share a colour and tell themselves apart
# by pattern, print, mark and cut: with uniform colours, colour alone named the item (a colour
# histogram found a shopper's photo among 81 items at R@1 0.51, real shop photos 0.07).
COLOUR_POPULARITY = np.array([
    0.22, 0.14, 0.10, 0.04, 0.03, 0.04, 0.02, 0.02,  # black white grey red burgundy pink orange yellow
    0.08, 0.05, 0.03, 0.02, 0.09, 0.05, 0.04, 0.03,  # beige brown green olive navy blue sky-blue purple
])
MOTIF_SHARE = 0.5  # products with a printed graphic on the body
CUT_SPREAD = 0.15  # how far a product's cut (silhouette proportions) strays from its leaf's
HIDDEN_TASTE_DIMS = 2  # latent facts a shopper cares about that no image, title or fact shows
SECONDS_PER_DAY = 86_400


@dataclass(frozen=True)
class Leaf:
    path: tuple[str, str, str]  # department, group, leaf
    shape: str
    synonyms: list[str]
    family: str
    proportions: tuple[float, float, float]
    base_price: float


@dataclass(frozen=True)
class Brand:
    name: str
    departments: frozenset[str]
    tier: int  # index into BRAND_TIER_PRICE
    mark: str
    mark_colour: tuple[int, int, int]


@dataclass
class Catalog:
    """Every item's facts, one numpy array per fact, indexed by item position."""

    leaves: list[Leaf]
    brands: list[Brand]
    shops: int
    spu: np.ndarray  # int32: SPU index
    leaf: np.ndarray  # int32
    brand: np.ndarray  # int32
    shop: np.ndarray  # int32
    colour: np.ndarray  # int16 into COLOUR_NAMES
    size: np.ndarray  # int16 into vocab.SIZES[family], -1 when the family has no sizes
    attrs: np.ndarray  # int16 (n, 3): value index of the family's attributes, -1 where absent
    pattern: np.ndarray  # int16 into PATTERNS
    pattern_colour: np.ndarray  # int16 into COLOUR_NAMES
    style: np.ndarray  # float32 (n, STYLE_DIMS) in [-1, 1]
    cut: np.ndarray  # float32 (n, 3) in [0, 1]: the silhouette's proportions (the leaf's, varied per SPU)
    motif: np.ndarray  # int32: seed of the printed graphic, -1 for none
    finish: np.ndarray  # float32 in [-1, 1]: how well made it looks (drawn; the visible part of appeal)
    hidden_appeal: np.ndarray  # float32 in [-1, 1]: appeal nothing shows (only behaviour reveals it)
    hidden_taste: np.ndarray  # float32 (n, HIDDEN_TASTE_DIMS): facts only behaviour reveals
    price: np.ndarray  # float64
    price_band: np.ndarray  # int8, 0..3
    created_at: np.ndarray  # int64 unix seconds
    is_new: np.ndarray  # bool: launched during the simulated period
    seed: int

    def __len__(self) -> int:
        return len(self.spu)


def item_id(index: np.ndarray | int) -> np.ndarray | str:
    return np.char.mod("sku%08d", index) if isinstance(index, np.ndarray) else f"sku{index:08d}"


def spu_id(index: np.ndarray) -> np.ndarray:
    return np.char.mod("spu%08d", index)


def shop_id(index: np.ndarray) -> np.ndarray:
    return np.char.mod("shop%05d", index)


def build_leaves(count: int, seed: int) -> list[Leaf]:
    """`count` leaves taken round-robin over departments (all appear), extended with variants if needed."""
    by_department = [
        [(dept, group, name, shape, syns) for group, leaves in groups.items() for name, (shape, syns) in leaves.items()]
        for dept, groups in vocab.CATEGORY_TREE.items()
    ]
    base = [leaf for leaf in chain.from_iterable(zip_longest(*by_department)) if leaf]
    chosen = base[:count]
    for variant in vocab.LEAF_VARIANTS:
        for dept, group, name, shape, syns in base:
            if len(chosen) >= count:
                break
            chosen.append((dept, group, f"{variant} {name}", shape, [f"{variant.lower()} {s}" for s in syns]))
    if len(chosen) < count:
        raise ValueError(f"at most {len(chosen)} leaf categories can be simulated, asked for {count}")
    rng = np.random.default_rng([seed, 1])
    return [
        Leaf(
            path=(dept, group, name),
            shape=shape,
            synonyms=syns,
            family=vocab.SHAPE_FAMILY[shape],
            proportions=tuple(float(p) for p in rng.uniform(0.1, 0.9, 3)),
            base_price=float(np.round(rng.lognormal(3.3, 0.7), 2)),
        )
        for dept, group, name, shape, syns in chosen
    ]


def build_brands(count: int, leaves: list[Leaf], seed: int) -> list[Brand]:
    rng = np.random.default_rng([seed, 2])
    departments = sorted({leaf.path[0] for leaf in leaves})
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(vocab.BRAND_SYLLABLES, rng.integers(2, 4))).capitalize()
        if name not in names:
            names.append(name)
    brands = []
    for i, name in enumerate(names):
        # The first brands cover every department so that no leaf is left without one.
        home = departments if i == 0 else list(rng.choice(departments, rng.integers(1, 3), replace=False))
        brands.append(
            Brand(
                name=name,
                departments=frozenset(home),
                tier=int(rng.choice(4, p=[0.3, 0.4, 0.2, 0.1])),
                mark=str(rng.choice(MARKS)),
                mark_colour=vocab.COLOURS[str(rng.choice(COLOUR_NAMES))][0],
            )
        )
    return brands


def build_catalog(world: WorldConfig, behaviour: BehaviourConfig, seed: int) -> Catalog:
    """Draws every SPU, expands it into SKU variants, and cuts the list at `world.items`."""
    rng = np.random.default_rng([seed, 3])
    leaves = build_leaves(world.leaf_categories, seed)
    brands = build_brands(world.brands, leaves, seed)

    skus_per_spu = 1 + np.minimum(rng.poisson(world.variants_per_spu - 1, world.items), 5)
    n_spu = int(np.searchsorted(np.cumsum(skus_per_spu), world.items) + 1)
    skus_per_spu = skus_per_spu[:n_spu]
    skus_per_spu[-1] -= skus_per_spu.sum() - world.items

    leaf_weight = 1.0 / (rng.permutation(len(leaves)) + 3.0) ** 0.8
    spu_leaf = rng.choice(len(leaves), n_spu, p=leaf_weight / leaf_weight.sum())
    spu_brand = _pick_brands(spu_leaf, leaves, brands, rng)
    shop_brands = rng.integers(0, len(brands), (world.shops, 3))  # each shop sells a few brands
    spu_shop = _pick_shops(spu_brand, shop_brands, rng)
    brand_style = rng.uniform(-0.8, 0.8, (len(brands), STYLE_DIMS))
    spu_style = np.clip(brand_style[spu_brand] + rng.normal(0, 0.45, (n_spu, STYLE_DIMS)), -1, 1)
    families = [leaf.family for leaf in leaves]
    spu_attrs = _pick_attribute_values(spu_leaf, families, rng)
    spu_pattern = rng.choice(len(PATTERNS), n_spu, p=PATTERN_WEIGHTS)
    # Each SPU's colours in the order its SKUs take them: a draw without replacement by popularity.
    spu_palette = np.argsort(-(np.log(COLOUR_POPULARITY) + rng.gumbel(size=(n_spu, len(COLOUR_NAMES)))), axis=1)
    spu_pattern_colour = (spu_palette[:, 0] + rng.integers(1, len(COLOUR_NAMES), n_spu)) % len(COLOUR_NAMES)
    leaf_proportions = np.array([leaf.proportions for leaf in leaves])
    spu_cut = np.clip(leaf_proportions[spu_leaf] + rng.normal(0, CUT_SPREAD, (n_spu, 3)), 0, 1)
    spu_motif = np.where(rng.random(n_spu) < MOTIF_SHARE, rng.integers(0, 2**31 - 1, n_spu), -1)
    spu_finish = rng.uniform(-1, 1, n_spu)
    spu_hidden_taste = rng.standard_normal((n_spu, HIDDEN_TASTE_DIMS))
    base_price = np.array([leaf.base_price for leaf in leaves])[spu_leaf]
    tier = np.array([brand.tier for brand in brands])[spu_brand]
    spu_price = np.round(base_price * BRAND_TIER_PRICE[tier] * rng.lognormal(0, 0.25, n_spu), 2)
    spu_is_new = rng.random(n_spu) < world.new_item_share
    start = unix_seconds(behaviour.start_date)
    spu_created = np.where(
        spu_is_new,
        start + (rng.random(n_spu) * behaviour.days * SECONDS_PER_DAY),
        start - (rng.random(n_spu) * 365 * SECONDS_PER_DAY) - 1,
    ).astype(np.int64)

    # Expand SPUs into SKUs: a variant is another colour, or (for sized families) another size.
    spu = np.repeat(np.arange(n_spu, dtype=np.int32), skus_per_spu)
    rank = np.arange(len(spu)) - np.repeat(np.cumsum(skus_per_spu) - skus_per_spu, skus_per_spu)
    sized = np.array([family in vocab.SIZES for family in families])[spu_leaf[spu]]
    size_variant = sized & (rank > 0) & (rng.random(len(spu)) < 0.3)
    colour_rank = _cumsum_within(~size_variant & (rank > 0), skus_per_spu)
    colour = spu_palette[spu, colour_rank % len(COLOUR_NAMES)]
    n_sizes = np.array([len(vocab.SIZES.get(f, [])) for f in families])[spu_leaf[spu]]
    size = np.where(sized, (rng.integers(0, 10, n_spu)[spu] + _cumsum_within(size_variant, skus_per_spu)) % np.maximum(n_sizes, 1), -1)
    price = np.round(spu_price[spu] * np.where(size_variant, 1.0 + 0.05 * rng.random(len(spu)), 1.0), 2)
    relative_price = spu_price / base_price
    return Catalog(
        leaves=leaves,
        brands=brands,
        shops=world.shops,
        spu=spu,
        leaf=spu_leaf[spu].astype(np.int32),
        brand=spu_brand[spu].astype(np.int32),
        shop=spu_shop[spu].astype(np.int32),
        colour=colour.astype(np.int16),
        size=size.astype(np.int16),
        attrs=spu_attrs[spu],
        pattern=spu_pattern[spu].astype(np.int16),
        pattern_colour=spu_pattern_colour[spu].astype(np.int16),
        style=spu_style[spu].astype(np.float32),
        cut=spu_cut[spu].astype(np.float32),
        motif=spu_motif[spu].astype(np.int32),
        finish=spu_finish[spu].astype(np.float32),
        hidden_appeal=rng.uniform(-1, 1, len(spu)).astype(np.float32),
        hidden_taste=spu_hidden_taste[spu].astype(np.float32),
        price=price,
        price_band=np.digitize(relative_price, PRICE_BAND_EDGES).astype(np.int8)[spu],
        created_at=spu_created[spu],
        is_new=spu_is_new[spu],
        seed=seed,
    )


def unix_seconds(day) -> int:
    return int(np.datetime64(day, "s").astype(np.int64))


def _cumsum_within(flags: np.ndarray, group_sizes: np.ndarray) -> np.ndarray:
    """Running count of `flags` inside each consecutive group."""
    total = np.cumsum(flags)
    group_start = np.repeat(np.cumsum(group_sizes) - group_sizes, group_sizes)
    before = np.where(group_start > 0, total[np.maximum(group_start - 1, 0)], 0)
    return total - before


def _pick_brands(spu_leaf, leaves, brands, rng) -> np.ndarray:
    """Each SPU's brand comes from the brands selling in its department, popular brands more often."""
    out = np.empty(len(spu_leaf), dtype=np.int32)
    leaf_department = np.array([leaf.path[0] for leaf in leaves])[spu_leaf]
    for department in np.unique(leaf_department):
        members = np.array([i for i, brand in enumerate(brands) if department in brand.departments])
        weight = 1.0 / (np.arange(len(members)) + 2.0)
        mask = leaf_department == department
        out[mask] = rng.choice(members, mask.sum(), p=weight / weight.sum())
    return out


def _pick_shops(spu_brand, shop_brands, rng) -> np.ndarray:
    """A shop that sells the SPU's brand when there is one, else any shop."""
    out = rng.integers(0, len(shop_brands), len(spu_brand)).astype(np.int32)
    for brand in np.unique(spu_brand):
        sellers = np.flatnonzero((shop_brands == brand).any(axis=1))
        mask = spu_brand == brand
        if len(sellers):
            out[mask] = rng.choice(sellers, mask.sum())
    return out


def _pick_attribute_values(spu_leaf, families, rng) -> np.ndarray:
    attrs = np.full((len(spu_leaf), 3), -1, dtype=np.int16)
    spu_family = np.array(families)[spu_leaf]
    for family, names in vocab.ATTRIBUTES.items():
        mask = spu_family == family
        for k, name in enumerate(names):
            attrs[mask, k] = rng.integers(0, len(names[name]), mask.sum())
    return attrs


# ---------------------------------------------------------------- rows of the items table


def look(catalog: Catalog, i: int) -> Look:
    """What item `i` looks like; SKUs that differ only in size look the same."""
    leaf = catalog.leaves[catalog.leaf[i]]
    brand = catalog.brands[catalog.brand[i]]
    return Look(
        shape=leaf.shape,
        proportions=tuple(float(p) for p in catalog.cut[i]),
        colour=vocab.COLOURS[COLOUR_NAMES[catalog.colour[i]]][0],
        pattern=PATTERNS[catalog.pattern[i]],
        pattern_colour=vocab.COLOURS[COLOUR_NAMES[catalog.pattern_colour[i]]][0],
        mark=brand.mark,
        mark_colour=brand.mark_colour,
        style=tuple(float(s) for s in catalog.style[i]),
        seed=int(catalog.spu[i]),
        motif=int(catalog.motif[i]),
        finish=float(catalog.finish[i]),
    )


def attributes(catalog: Catalog, i: int) -> dict[str, str]:
    leaf = catalog.leaves[catalog.leaf[i]]
    attrs = {"brand": catalog.brands[catalog.brand[i]].name, "colour": COLOUR_NAMES[catalog.colour[i]]}
    for k, (name, values) in enumerate(vocab.ATTRIBUTES[leaf.family].items()):
        attrs[name] = values[catalog.attrs[i, k]]
    if catalog.size[i] >= 0:
        attrs["size"] = vocab.SIZES[leaf.family][catalog.size[i]]
    return attrs


def title(catalog: Catalog, i: int, noise: float) -> str:
    """A marketplace title: brand, gender, colour, attributes and product noun, with realistic noise.

    The wording (synonyms, slots kept, order, marketing words) is drawn per SPU, so SKU
    variants share a title that differs only in colour or size. Pattern and visual style
    are never written: they are visible only in the image.
    """
    rng = np.random.default_rng([catalog.seed, 4, int(catalog.spu[i])])
    leaf = catalog.leaves[catalog.leaf[i]]
    attrs = attributes(catalog, i)
    colour_words = vocab.COLOURS[attrs["colour"]][1]
    words = {
        "brand": attrs["brand"] if rng.random() > 0.1 * noise else "",
        "gender": rng.choice(vocab.GENDER_WORDS[leaf.path[0]]) if leaf.path[0] in vocab.GENDER_WORDS else "",
        "colour": colour_words[rng.integers(len(colour_words))] if rng.random() > 0.3 * noise else "",
        "noun": leaf.synonyms[rng.integers(len(leaf.synonyms))],
    }
    extras = [value for name, value in attrs.items() if name in vocab.ATTRIBUTES[leaf.family]]
    kept = [value for value in extras if rng.random() > noise]
    order = ["brand", "gender", "colour", "attrs", "noun"]
    if rng.random() < noise:  # word order varies between sellers
        a, b = rng.choice(len(order), 2, replace=False)
        order[a], order[b] = order[b], order[a]
    parts = [" ".join(kept) if slot == "attrs" else words[slot] for slot in order]
    marketing = rng.choice(vocab.MARKETING_WORDS, rng.binomial(2, noise), replace=False)
    if len(marketing):
        parts.insert(0 if rng.random() < 0.6 else len(parts), " ".join(marketing))
    if "size" in attrs and rng.random() < 0.5:
        parts.append(f"size {attrs['size']}")
    text = " ".join(p for p in parts if p)
    return text[:1].upper() + text[1:]


def items_table(catalog: Catalog, start: int, stop: int, world: WorldConfig) -> pa.Table:
    """Rows `start:stop` of the items table, with titles composed and images drawn."""
    index = np.arange(start, stop)
    leaves = catalog.leaves
    return pa.table(
        {
            "item_id": item_id(index),
            "spu_id": spu_id(catalog.spu[index]),
            "title": [title(catalog, i, world.title_noise) for i in index],
            "category": [list(leaves[catalog.leaf[i]].path) for i in index],
            "attributes": [list(attributes(catalog, i).items()) for i in index],
            "image": [encode_png(draw_item(look(catalog, i), world.image_size)) for i in index],
            "shop_id": shop_id(catalog.shop[index]),
            "price": catalog.price[index],
            "created_at": (catalog.created_at[index] * 1000).astype("datetime64[ms]"),
        },
        schema=schema.ITEMS,
    )
