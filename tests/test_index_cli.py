"""`moon index`: the vector index of a store version is built, finds every item as its own nearest
neighbour, gains exactly the items `moon embed --incremental` added, and has one index per
Matryoshka dimension with --per-dim."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import STORE_ITEMS, STORE_OVERRIDES, store_config, write_items
from moon.cli import cli
from moon.errors import UserError
from moon.io.tables import read_table
from moon.represent import embed_catalogue
from moon.run import RunDir
from moon.store.index import VectorIndex
from moon.store.indexing import is_current, load_index
from moon.store.versions import Store


def moon_index(run_dir, *args):
    """`moon index` in this process (the CLI's own parsing, errors and output)."""
    result = CliRunner().invoke(cli, ["index", "--quiet", "--run-dir", str(run_dir), *args, *STORE_OVERRIDES])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def assert_finds_itself(index: VectorIndex, vectors: np.ndarray, ids: list[str]):
    """Every item's own vector finds the item first (or an item with an identical vector)."""
    scores, found = index.search(vectors, k=1)
    itself = found[:, 0] == np.asarray(ids)
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    twins = [i for i in np.flatnonzero(~itself) if np.allclose(vectors[i], vectors[ids.index(found[i, 0])], atol=1e-6)]
    assert itself.sum() + len(twins) == len(ids)
    assert itself.mean() > 0.9


@pytest.fixture
def embedded(store_world, tmp_path):
    """A copy of the store world with store version v1-stage2 of its 200 items."""
    run_dir = tmp_path / "run"
    shutil.copytree(store_world, run_dir)
    embed_catalogue(store_config(), run_dir)
    return run_dir


def test_index_builds_per_dim_and_extends_with_exactly_the_new_items(embedded, tiny_world):
    result = moon_index(embedded, "--per-dim")
    assert result.exit_code == 0, result.output
    assert "built full, dim-16" in result.output and "exact" in result.output
    root = embedded / "index" / "v1-stage2"
    version = Store(embedded).made_by(RunDir(embedded).model("stage2"))
    assert version == "v1-stage2" and is_current(embedded, version)

    stored = embed_catalogue(store_config(), embedded)  # current: the same version
    ids = stored.item_ids()
    for folder, dim in (("full", 32), ("dim-16", 16)):
        index = VectorIndex.load(root / folder)
        assert (index.kind, index.dim, index.size) == ("exact", dim, STORE_ITEMS)
        assert index.ids.tolist() == ids
        assert_finds_itself(index, stored.vectors(dim), ids)
    assert load_index(embedded, dim=16).dim == 16 and load_index(embedded).size == STORE_ITEMS
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["store_version"] == "v1-stage2" and manifest["count"] == STORE_ITEMS
    assert {name: entry["dim"] for name, entry in manifest["indexes"].items()} == {"full": 32, "dim-16": 16}

    again = moon_index(embedded)
    assert again.exit_code == 0 and "is current: it holds all 200 items" in again.output
    assert "current" in again.output and "built" not in again.output

    catalogue = read_table(tiny_world, "items")
    write_items(embedded, catalogue)  # 40 items launched since the version was made
    grown = embed_catalogue(store_config(), embedded, incremental=True)
    assert not is_current(embedded, "v1-stage2")
    before = VectorIndex.load(root / "full").faiss_index.ntotal
    added = moon_index(embedded)  # without --per-dim: the saved dim-16 index is kept up to date too
    assert added.exit_code == 0, added.output
    new = catalogue.num_rows - STORE_ITEMS
    assert f"added {new} new items" in added.output and "built" not in added.output
    assert before == STORE_ITEMS and is_current(embedded, "v1-stage2")
    all_ids = grown.item_ids()
    assert all_ids[:STORE_ITEMS] == ids and len(all_ids) == catalogue.num_rows
    for folder, dim in (("full", 32), ("dim-16", 16)):
        index = VectorIndex.load(root / folder)
        assert index.size == catalogue.num_rows and index.ids.tolist() == all_ids  # old positions kept, new after
        assert_finds_itself(index, grown.vectors(dim), all_ids)
    assert not list(root.glob(".*"))  # every save was renamed into place


def test_another_kind_rebuilds_and_reports_its_recall_against_exact_search(embedded):
    assert moon_index(embedded).exit_code == 0
    result = moon_index(embedded, "--kind", "hnsw")
    assert result.exit_code == 0, result.output
    assert "built full" in result.output and "hnsw" in result.output
    index = VectorIndex.load(embedded / "index" / "v1-stage2" / "full")
    assert index.kind == "hnsw" and index.size == STORE_ITEMS
    recall = json.loads((embedded / "index" / "v1-stage2" / "manifest.json").read_text())["indexes"]["full"]
    assert recall["kind"] == "hnsw" and 0.9 <= recall["ann_recall@10"] <= 1.0
    assert f"{recall['ann_recall@10']:.4f}" in result.output
    kept = moon_index(embedded)  # auto keeps the saved kind
    assert "is current" in kept.output and VectorIndex.load(embedded / "index" / "v1-stage2" / "full").kind == "hnsw"


def test_index_without_a_store_version_is_a_user_error(store_world, tmp_path):
    result = moon_index(store_world)
    assert result.exit_code == 2 and "run `moon embed` first" in result.output
    result = moon_index(store_world, "--version", "v9-stage2")
    assert result.exit_code == 2 and "does not exist" in result.output
    assert not (store_world / "index").exists()
    assert Store(store_world).made_by(RunDir(store_world).model("stage1")) is None  # no such model


def test_load_index_says_how_to_make_a_missing_one(embedded):
    with pytest.raises(UserError, match="moon index --version v1-stage2 --per-dim"):
        load_index(embedded, dim=16)
