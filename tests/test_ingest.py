"""Ingest of real catalogues (shared/data) and of tiny hand-made sources, one per reject reason."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import shared_data
from moon.config import load_config
from moon.errors import UserError
from moon.io.images import ImageError, check_image
from moon.io.schema import ITEMS, REJECTS
from moon.io.tables import read_manifest, read_table
from moon.sources import catalogue as ingest_module
from moon.sources.catalogue import ingest

KAGGLE_HEADER = "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName"


def jpeg(size=(8, 8), colour="red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG")
    return buffer.getvalue()


def noisy_jpeg(size=(64, 64)) -> bytes:
    """A JPEG with enough entropy that cutting it in half really loses image data."""
    image = Image.effect_noise(size, 64).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def good_rows() -> list[dict]:
    return [
        {"item_id": "a1", "title": "Red Cotton Shirt", "category": "Apparel", "image": "a1.jpg"},
        {"item_id": "a2", "title": "Blue Denim Jeans", "category": "Apparel", "image": "a2.jpg"},
    ]


def write_catalogue(tmp_path: Path, rows: list[dict], images: dict[str, bytes] | None = None) -> Path:
    """A CSV in MOON's own column layout, with images/ holding a good JPEG for each good row."""
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    for row in good_rows():
        (folder / row["image"]).write_bytes(jpeg())
    for name, data in (images or {}).items():
        (folder / name).write_bytes(data)
    path = tmp_path / "catalogue.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["item_id", "title", "category", "image"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def run(tmp_path: Path, source: Path, *overrides: str):
    """Ingests `source`; returns the summary, the kept items and the rejects as Python rows."""
    config = load_config(None, ["ingest.image_dir=images", *overrides])
    run_dir = tmp_path / "run"
    summary = ingest(source, config, run_dir)
    items = read_table(run_dir, "items").to_pylist() if summary.kept else []
    rejects = pq.read_table(run_dir / "rejects.parquet").to_pylist()
    return summary, items, rejects


def only_reject(rejects: list[dict], reason: str) -> dict:
    assert [r["reason"] for r in rejects] == [reason], rejects
    return rejects[0]


def assert_good_rows_kept(items: list[dict]) -> None:
    assert sorted(item["item_id"] for item in items) == ["a1", "a2"]


# --- real catalogues ---------------------------------------------------------------------------


def test_kaggle_sample_is_ingested_completely(tmp_path):
    kaggle = shared_data("fashion-2k-kaggle")
    data_lines = len((kaggle / "styles.csv").read_text().splitlines()) - 1
    summary = ingest(kaggle, load_config(), tmp_path / "run")
    table = read_table(tmp_path / "run", "items")
    rejects = pq.read_table(tmp_path / "run" / "rejects.parquet")

    assert summary.format == "kaggle" and summary.layout == "kaggle-fashion"
    assert summary.kept + summary.rejected == data_lines
    assert rejects.num_rows == summary.rejected and rejects.schema.equals(REJECTS)
    assert table.schema.equals(ITEMS)
    ids = table["item_id"].to_pylist()
    assert len(ids) == len(set(ids)) == summary.kept
    assert all(len(category) == 3 for category in table["category"].to_pylist())
    for data in table["image"].to_pylist():
        Image.open(io.BytesIO(data)).load()
    years = [dict(attrs).get("year") for attrs in table["attributes"].to_pylist()]
    assert all(year is None or year.isdigit() for year in years)  # "2012.0" in the CSV
    manifest = read_manifest(tmp_path / "run", "items")
    assert manifest["stage"] == "ingest" and manifest["simulated"] is False
    assert manifest["kept"] == summary.kept and manifest["source"] == str(kaggle.resolve())


def test_parquet_shard_keeps_images_and_attributes(tmp_path):
    shard = sorted(shared_data("fashion-44k").glob("*.parquet"))[-1]
    source = pq.ParquetFile(shard)
    summary = ingest(shard, load_config(), tmp_path / "run")
    table = read_table(tmp_path / "run", "items")

    assert summary.layout == "fashion-parquet"
    assert summary.kept + summary.rejected == source.metadata.num_rows
    attributes = [dict(attrs) for attrs in table["attributes"].to_pylist()]
    assert sum("colour" in a and "usage" in a for a in attributes) > 0.95 * table.num_rows
    first = source.read_row_group(0, columns=["item_id", "image"]).slice(0, 1).to_pylist()[0]
    images = dict(zip(table["item_id"].to_pylist(), table["image"].to_pylist()))
    assert images[first["item_id"]] == first["image"]  # JPEG bytes are stored untouched


def test_kaggle_line_with_unquoted_comma_is_a_malformed_line(tmp_path):
    (tmp_path / "images").mkdir()
    for item_id in ("1", "2", "3"):
        (tmp_path / "images" / f"{item_id}.jpg").write_bytes(jpeg())
    lines = [
        KAGGLE_HEADER,
        "1,Men,Apparel,Topwear,Shirts,Blue,Summer,2012.0,Casual,Blue Shirt",
        "2,Women,Apparel,Topwear,Tops,Red,Summer,2012.0,Casual,Red Top, Sleeveless",
        "3,Men,Footwear,Shoes,Casual Shoes,Black,Fall,,Casual,Black Shoes",
    ]
    (tmp_path / "styles.csv").write_text("\n".join(lines) + "\n")
    summary, items, rejects = run(tmp_path, tmp_path, "ingest.image_dir=null")

    reject = only_reject(rejects, "malformed_line")
    assert (reject["row"], reject["detail"]) == (3, "expected 10 fields, got 11")
    assert [item["item_id"] for item in items] == ["1", "3"]
    assert dict(items[1]["attributes"]) == {"gender": "Men", "colour": "Black", "season": "Fall", "usage": "Casual"}


# --- one test per reject reason ----------------------------------------------------------------


def test_missing_image(tmp_path):
    rows = [*good_rows(), {"item_id": "a3", "title": "Green Cap", "category": "Accessories", "image": "a3.jpg"}]
    summary, items, rejects = run(tmp_path, write_catalogue(tmp_path, rows))
    reject = only_reject(rejects, "missing_image")
    assert (reject["item_id"], reject["row"]) == ("a3", 4)
    assert "a3.jpg" in reject["detail"]
    assert_good_rows_kept(items)
    assert summary.rejected_by_reason["missing_image"] == 1


def test_corrupt_image(tmp_path):
    rows = [*good_rows(), {"item_id": "a3", "title": "Green Cap", "category": "Accessories", "image": "a3.jpg"}]
    truncated = noisy_jpeg()[:-400]
    _, items, rejects = run(tmp_path, write_catalogue(tmp_path, rows, {"a3.jpg": truncated}))
    assert only_reject(rejects, "corrupt_image")["item_id"] == "a3"
    assert_good_rows_kept(items)


def test_garbage_bytes_are_a_corrupt_image(tmp_path):
    rows = [*good_rows(), {"item_id": "a3", "title": "Green Cap", "category": "Accessories", "image": "a3.jpg"}]
    _, items, rejects = run(tmp_path, write_catalogue(tmp_path, rows, {"a3.jpg": b"not an image at all"}))
    only_reject(rejects, "corrupt_image")
    assert_good_rows_kept(items)


def test_image_too_large(tmp_path):
    rows = [*good_rows(), {"item_id": "a3", "title": "Huge Poster", "category": "Decor", "image": "a3.jpg"}]
    source = write_catalogue(tmp_path, rows, {"a3.jpg": jpeg(size=(200, 200))})
    _, items, rejects = run(tmp_path, source, "ingest.max_image_pixels=10000")
    assert only_reject(rejects, "image_too_large")["item_id"] == "a3"
    assert_good_rows_kept(items)
    assert Image.MAX_IMAGE_PIXELS > 10000  # PIL's global guard is restored afterwards


def test_image_size_is_checked_from_the_header_outside_an_ingest_too():
    with pytest.raises(ImageError, match="200x200") as error:
        check_image(jpeg(size=(200, 200)), max_pixels=10_000)
    assert error.value.reason == "image_too_large"


def test_duplicate_id_keeps_the_first(tmp_path):
    rows = [*good_rows(), {"item_id": "a1", "title": "Another Shirt", "category": "Apparel", "image": "a2.jpg"}]
    _, items, rejects = run(tmp_path, write_catalogue(tmp_path, rows))
    reject = only_reject(rejects, "duplicate_id")
    assert (reject["item_id"], reject["row"]) == ("a1", 4)
    assert_good_rows_kept(items)
    assert next(item for item in items if item["item_id"] == "a1")["title"] == "Red Cotton Shirt"


def test_malformed_csv_line(tmp_path):
    source = write_catalogue(tmp_path, good_rows())
    with open(source, "a") as handle:
        handle.write('a3,"Quoted, fine",Apparel,a1.jpg\n')  # a quoted comma is not malformed
        handle.write("a4,Cap, Green,Accessories,a2.jpg\n")
    _, items, rejects = run(tmp_path, source)
    reject = only_reject(rejects, "malformed_line")
    assert (reject["row"], reject["detail"]) == (5, "expected 4 fields, got 5")
    assert sorted(item["item_id"] for item in items) == ["a1", "a2", "a3"]


def test_malformed_jsonl_line(tmp_path):
    write_catalogue(tmp_path, [])
    first, second = good_rows()
    lines = [json.dumps(first), '{"item_id": "a3", "title": ', "[1, 2]", "", json.dumps(second)]
    source = tmp_path / "catalogue.jsonl"
    source.write_text("\n".join(lines) + "\n")
    _, items, rejects = run(tmp_path, source)
    assert [(r["reason"], r["row"]) for r in rejects] == [("malformed_line", 2), ("malformed_line", 3)]
    assert "expected a JSON object" in rejects[1]["detail"]
    assert_good_rows_kept(items)


def test_empty_title(tmp_path):
    rows = [*good_rows(), {"item_id": "a3", "title": "   ", "category": "Apparel", "image": "a1.jpg"}]
    _, items, rejects = run(tmp_path, write_catalogue(tmp_path, rows))
    assert only_reject(rejects, "empty_title")["item_id"] == "a3"
    assert_good_rows_kept(items)


def test_missing_category(tmp_path):
    rows = [*good_rows(), {"item_id": "a3", "title": "Mystery Box", "category": "", "image": "a1.jpg"}]
    _, items, rejects = run(tmp_path, write_catalogue(tmp_path, rows))
    assert only_reject(rejects, "missing_category")["item_id"] == "a3"
    assert_good_rows_kept(items)


def test_missing_id(tmp_path):
    rows = [*good_rows(), {"item_id": " ", "title": "Nameless Hat", "category": "Apparel", "image": "a1.jpg"}]
    _, items, rejects = run(tmp_path, write_catalogue(tmp_path, rows))
    reject = only_reject(rejects, "missing_id")
    assert (reject["item_id"], reject["row"]) == (None, 4)
    assert_good_rows_kept(items)


# --- mapping and storage -----------------------------------------------------------------------


def test_custom_columns_jsonl_with_image_file_pattern(tmp_path):
    write_catalogue(tmp_path, [])  # images/a1.jpg and images/a2.jpg
    lines = [
        {"sku": "a1", "name": "Red  Cotton shirt", "l1": "Apparel", "l2": "Shirts", "colour": "Red", "year": 2012.0},
        {"sku": "a2", "name": "red cotton Shirt", "l1": "Apparel", "l2": None, "colour": "", "price": "9.5"},
    ]
    source = tmp_path / "catalogue.jsonl"
    source.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    overrides = [
        "ingest.columns={item_id: sku, title: name, category: [l1, l2], attributes: {colour: colour, year: year}}",
        "ingest.spu_from_title=true",
    ]
    summary, items, rejects = run(tmp_path, source, *overrides)
    assert summary.layout == "custom" and rejects == []
    first, second = items
    assert first["category"] == ["Apparel", "Shirts"] and second["category"] == ["Apparel"]
    assert dict(first["attributes"]) == {"colour": "Red", "year": "2012"}
    assert dict(second["attributes"]) == {}
    assert first["spu_id"] == second["spu_id"] != "a1"  # same title once normalised


def test_other_image_formats_are_stored_as_png(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(buffer, "BMP")
    rows = [*good_rows(), {"item_id": "a3", "title": "Blue Tile", "category": "Home", "image": "a3.bmp"}]
    _, items, _ = run(tmp_path, write_catalogue(tmp_path, rows, {"a3.bmp": buffer.getvalue()}))
    stored = {item["item_id"]: item["image"] for item in items}
    assert Image.open(io.BytesIO(stored["a3"])).format == "PNG"
    assert stored["a1"] == jpeg()  # JPEG kept as its original bytes


# --- whole-source errors -----------------------------------------------------------------------


def test_unknown_layout_names_the_columns_found(tmp_path):
    source = tmp_path / "odd.csv"
    source.write_text("sku_code,label\n1,Shirt\n")
    with pytest.raises(UserError, match="sku_code, label") as error:
        ingest(source, load_config(), tmp_path / "run")
    assert "ingest.columns" in str(error.value)
    assert not (tmp_path / "run").exists()


def test_missing_source_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        ingest(tmp_path / "nowhere.csv", load_config(), tmp_path / "run")


def test_failed_ingest_leaves_the_previous_table_and_no_partial_one(tmp_path, monkeypatch):
    rows = [*good_rows(), {"item_id": "a3", "title": "Green Cap", "category": "Accessories", "image": "a1.jpg"}]
    source = write_catalogue(tmp_path, rows)
    run(tmp_path, source)  # a first, complete ingest of 3 items
    calls = []

    def failing_check(data, max_pixels):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return data

    monkeypatch.setattr(ingest_module, "check_image", failing_check)
    with pytest.raises(RuntimeError):
        run(tmp_path, source, "ingest.shard_rows=1")  # two shards are written before the failure
    run_dir = tmp_path / "run"
    assert not list(run_dir.glob(".items*"))
    assert read_manifest(run_dir, "items")["kept"] == 3
    assert read_table(run_dir, "items").num_rows == 3


def test_kaggle_folder_without_images_is_a_user_error_with_rejects(tmp_path):
    folder = tmp_path / "kaggle"
    folder.mkdir()
    shutil.copy(shared_data("fashion-2k-kaggle") / "styles.csv", folder / "styles.csv")
    with pytest.raises(UserError, match="missing_image") as error:
        ingest(folder, load_config(), tmp_path / "run")
    assert str(folder / "images") in str(error.value)
    rejects = pq.read_table(tmp_path / "run" / "rejects.parquet").to_pylist()
    assert {r["reason"] for r in rejects} == {"missing_image", "empty_title"}
    assert not (tmp_path / "run" / "items").exists()
