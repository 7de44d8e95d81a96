"""Near-duplicate groups on hand-made catalogues whose duplicates are known."""

from __future__ import annotations

import io
from itertools import combinations

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageDraw

from moon.io import schema
from moon.pairs.duplicates import Fingerprints, image_duplicate_pairs, near_duplicate_groups

LONG_TITLE = "Velora women red floral print cotton summer maxi dress with side pockets and waist belt"


def drawing(seed: int) -> Image.Image:
    """A product-like picture: a few coloured shapes on a white background, laid out by `seed`."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (64, 64), "white")
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = rng.integers(4, 36, 2)
        x1, y1 = x0 + rng.integers(12, 28), y0 + rng.integers(12, 28)
        colour = tuple(int(c) for c in rng.integers(0, 200, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    return image


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def one_pixel_changed(image: Image.Image) -> Image.Image:
    changed = image.copy()
    changed.putpixel((32, 32), (0, 0, 0))
    return changed


def catalogue(rows: list[tuple[str, bytes, str]]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {"item_id": item_id, "spu_id": item_id, "title": title, "category": ["Women", "Dresses"], "image": image}
            for item_id, image, title in rows
        ],
        schema=schema.ITEMS,
    )


def groups(table: pa.Table) -> dict[str, list[tuple[str, str]]]:
    """group_id -> [(item_id, by)]"""
    found: dict[str, list[tuple[str, str]]] = {}
    for row in table.to_pylist():
        found.setdefault(row["group_id"], []).append((row["item_id"], row["by"]))
    return found


def test_same_picture_under_other_ids_is_one_image_group():
    picture = drawing(1)
    items = catalogue(
        [
            ("a1", encode(picture), "Kalo red ceramic mug"),
            ("a2", encode(picture), "Roar blue linen shirt"),  # the same bytes
            ("a3", encode(picture, "JPEG", quality=75), "Suvi black leather wallet"),  # re-compressed
            ("a4", encode(one_pixel_changed(picture)), "Mira green silk scarf"),
            ("b1", encode(drawing(2)), "Tono white canvas sneakers"),  # another picture
            ("b2", encode(drawing(3)), "Lumi yellow wool beanie"),
        ]
    )
    result = near_duplicate_groups(items, phash_distance=4, title_similarity=0.9)
    assert result.schema == schema.NEAR_DUPLICATES
    assert groups(result) == {"a1": [("a1", "image"), ("a2", "image"), ("a3", "image"), ("a4", "image")]}


def test_titles_differing_by_one_marketing_word_are_one_title_group():
    items = catalogue(
        [
            ("t1", encode(drawing(4)), LONG_TITLE),
            ("t2", encode(drawing(5)), "New " + LONG_TITLE),
            ("t3", encode(drawing(6)), LONG_TITLE.replace("red floral print cotton", "blue striped linen")),
            ("t4", encode(drawing(7)), "Kintaro men black leather belt"),
        ]
    )
    result = near_duplicate_groups(items, phash_distance=4, title_similarity=0.9)
    assert groups(result) == {"t1": [("t1", "title"), ("t2", "title")]}


def test_image_and_title_relations_merge_into_one_group():
    items = catalogue(
        [
            ("x2", encode(drawing(8)), LONG_TITLE),
            ("x1", encode(drawing(8)), "Kintaro men black leather belt"),  # x2's picture
            ("x3", encode(drawing(9)), LONG_TITLE + " sale"),  # x2's title
            ("x4", encode(drawing(10)), "Suvi black leather wallet"),
        ]
    )
    result = near_duplicate_groups(items, phash_distance=4, title_similarity=0.9)
    assert groups(result) == {"x1": [("x1", "image"), ("x2", "image+title"), ("x3", "title")]}


def test_different_pictures_with_alike_hashes_stay_apart():
    # Two silhouettes of one shape in different colours share their grey layout, hence
    # nearly their phash, but are not the same picture.
    red, blue = (Image.new("RGB", (64, 64), "white") for _ in range(2))
    ImageDraw.Draw(red).rectangle((16, 8, 48, 56), fill=(200, 30, 40))
    ImageDraw.Draw(blue).rectangle((16, 8, 48, 56), fill=(40, 100, 210))
    items = catalogue([("r", encode(red), "Kalo red ceramic mug"), ("b", encode(blue), "Roar blue linen shirt")])
    assert near_duplicate_groups(items, phash_distance=4, title_similarity=0.9).num_rows == 0


def test_undecodable_images_and_empty_catalogues_give_no_groups():
    items = catalogue([("c1", b"not an image", "Kalo mug"), ("c2", b"not an image", "Roar shirt")])
    assert near_duplicate_groups(items, 4, 0.9).num_rows == 0
    assert near_duplicate_groups(catalogue([]), 4, 0.9).num_rows == 0


@pytest.mark.parametrize("distance", [0, 1, 4, 9])
def test_hash_bands_find_every_pair_within_the_distance(distance):
    rng = np.random.default_rng(distance)
    base = rng.integers(0, 2**63, 40, dtype=np.uint64)
    flips = [np.uint64(sum(1 << int(b) for b in rng.choice(64, rng.integers(0, 2 * distance + 2), replace=False)))
             for _ in base]  # fmt: skip
    hashes = np.concatenate([base, base ^ np.array(flips, np.uint64)])
    n = len(hashes)
    prints = Fingerprints(hashes, np.zeros((n, 16, 16, 3), np.uint8), np.ones(n, bool), [frozenset()] * n)
    found = {tuple(sorted(pair)) for pair in image_duplicate_pairs(prints, distance).tolist()}
    expected = {(i, j) for i, j in combinations(range(n), 2) if int(hashes[i] ^ hashes[j]).bit_count() <= distance}
    assert found == expected
