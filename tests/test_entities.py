"""Gazetteer NER on real fashion titles (one shard of shared/data) and on the simulated world."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pytest

from conftest import shared_data
from moon import ui
from moon.config import load_config
from moon.io import schema
from moon.io.tables import read_manifest, read_table
from moon.pairs.entities import Gazetteer
from moon.sources.catalogue import ingest


@pytest.fixture(scope="module")
def real_items(tmp_path_factory):
    """Items of one fashion-44k shard: no brand attribute, so brands are learned from titles."""
    shard = min(shared_data("fashion-44k").glob("*.parquet"))
    source = tmp_path_factory.mktemp("shard") / shard.name
    shutil.copy(shard, source)
    run_dir = tmp_path_factory.mktemp("run")
    ui.set_quiet(True)
    try:
        ingest(source, load_config(), run_dir)
    finally:
        ui.set_quiet(False)
    return read_table(run_dir, "items")


@pytest.fixture(scope="module")
def real(real_items):
    return Gazetteer.from_items(real_items)


@pytest.mark.parametrize(
    "title, expected",
    [
        (
            "Puma Men Blue Sports Shoes",
            [("brand", "Puma"), ("gender", "Men"), ("colour", "Blue"), ("category", "Sports Shoes")],
        ),
        (  # the catalogue's article type is "Tshirts": of "T-shirt" it knows the "shirt"
            "United Colors of Benetton Women Red T-shirt",
            [("brand", "United Colors of Benetton"), ("gender", "Women"), ("colour", "Red"), ("category", "shirt")],
        ),
        (
            "Fastrack Men Analogue Grey Watches",
            [("brand", "Fastrack"), ("gender", "Men"), ("colour", "Grey"), ("category", "Watches")],
        ),
        (
            "Red Tape Men's Brown Semi Formal Shoe",  # a brand that starts with a colour
            [("brand", "Red Tape"), ("gender", "Men's"), ("colour", "Brown"), ("category", "Formal Shoe")],
        ),
    ],
)
def test_real_titles_yield_brand_gender_colour_and_article_type(real_items, real, title, expected):
    assert title in real_items["title"].to_pylist()
    assert real.entities(title) == expected


def test_matches_respect_word_boundaries(real):
    assert real.entities("Women Kurta") == [("gender", "Women"), ("category", "Kurta")]  # no "men" inside
    assert real.entities("shredded menswear") == []  # no "red", no "men"
    assert real.entities("Blue-Red") == [("colour", "Blue"), ("colour", "Red")]


def test_case_and_punctuation_insensitive(real):
    kinds = [kind for kind, _ in real.entities("Puma Men Blue T-Shirt")]
    for variant in ("PUMA MEN BLUE T-SHIRTS", "puma men blue tshirt", "puma, men: blue (t shirt)"):
        assert [kind for kind, _ in real.entities(variant)] == kinds
    assert real.entities("men's watch") == [("gender", "men's"), ("category", "watch")]
    assert real.entities("WATCHES") == [("category", "WATCHES")]


def test_count_agrees_with_entities_on_every_real_title(real_items, real):
    titles = real_items["title"].to_pylist() + [None, "", "Women\nRed Kurta"]
    counts = real.count(titles)
    assert counts.dtype.name == "int32" and len(counts) == len(titles)
    assert counts.tolist() == [len(real.entities(title or "")) for title in titles]
    assert counts[-3:].tolist() == [0, 0, 3]
    assert real.count([]).tolist() == []


def test_simulated_titles_name_brand_colour_material_and_category(tiny_world):
    items = read_table(tiny_world, "items")
    gazetteer = Gazetteer.from_items(items, read_manifest(tiny_world, "items")["lexicon"])
    found = {"brand": 0, "colour": 0, "material": 0, "category": 0}
    for title, attributes in zip(items["title"].to_pylist(), items["attributes"].to_pylist()):
        attributes = dict(attributes)
        entities = gazetteer.entities(title)
        surfaces = {(kind, surface.lower()) for kind, surface in entities}
        for kind in ("brand", "material"):
            value = attributes.get(kind, "").lower()
            if value and f" {value} " in f" {title.lower()} ":
                assert (kind, value) in surfaces, (title, entities)
                found[kind] += 1
        found["colour"] += any(kind == "colour" for kind, _ in entities)
        found["category"] += any(kind == "category" for kind, _ in entities)
    assert found["brand"] >= 0.8 * items.num_rows
    assert min(found.values()) > 0.3 * items.num_rows


def test_the_words_of_a_simulated_world_come_only_from_its_own_lexicon(tiny_world):
    items = read_table(tiny_world, "items")
    text = "tangerine jet black"  # simulator synonyms that no catalogue field holds
    assert Gazetteer.from_items(items).entities(text) in ([], [("colour", "black")])  # a catalogue alone
    lexicon = read_manifest(tiny_world, "items")["lexicon"]
    assert Gazetteer.from_items(items, lexicon).entities(text) == [("colour", "tangerine"), ("colour", "jet black")]
    with pytest.raises(ValueError, match="lexicon entity type 'shade'"):
        Gazetteer.from_items(items, {"shade": ["teal"]})


def test_brand_attribute_is_used_as_given():
    items = pa.Table.from_pylist(
        [
            {"item_id": "1", "spu_id": "1", "title": "Kintaro red dress", "category": ["Women", "Dresses"],
             "attributes": [("brand", "Kintaro"), ("colour", "red")], "image": b""},
            {"item_id": "2", "spu_id": "2", "title": "Velora silk blouse", "category": ["Women", "Blouses"],
             "attributes": [("brand", "Velora"), ("material", "silk")], "image": b""},
        ],
        schema=schema.ITEMS,
    )  # fmt: skip
    gazetteer = Gazetteer.from_items(items)
    assert gazetteer.entities("velora silk blouses") == [
        ("brand", "velora"),
        ("material", "silk"),
        ("category", "blouses"),
    ]
    assert gazetteer.entities("Kintaro dress") == [("brand", "Kintaro"), ("category", "dress")]
