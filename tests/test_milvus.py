"""A store version in Milvus (a real Milvus Lite in a temporary folder): every vector and leaf round-trips,
searches equal brute-force cosine top-k over the version, a leaf filter keeps only that leaf, the alias
moves to a second version while searches keep being answered by exactly one version, and exporting
again skips, completes or replaces the collection as its documented rules say."""

import json
import shutil
import sys
import threading

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import STORE_OVERRIDES, publish_untrained, store_config
from moon.cli import cli
from moon.errors import UserError
from moon.io.tables import read_table
from moon.represent import embed_catalogue
from moon.store.milvus import (
    EXPORT_PROPERTY,
    MilvusSearcher,
    collection_name,
    export_version,
    leaf_filter,
    milvus_client,
)
from moon.store.versions import Store

# moon.store.milvus imports pymilvus only when it is used; without it (and Milvus Lite) nothing here can run
pytest.importorskip("pymilvus", reason="pymilvus and milvus-lite are installed by the dev extra")
pytest.importorskip("milvus_lite", reason="pymilvus and milvus-lite are installed by the dev extra")

K = 10


@pytest.fixture(scope="module")
def world(store_world, tmp_path_factory):
    """A run with two store versions of the same 200 items, by two untrained models, and a Milvus Lite folder."""
    run_dir = tmp_path_factory.mktemp("milvus") / "run"
    shutil.copytree(store_world, run_dir)
    first = embed_catalogue(store_config(), run_dir)
    publish_untrained(run_dir, "stage1", seed=1)
    second = embed_catalogue(store_config(), run_dir, model="stage1")
    uri = str(run_dir.parent / "milvus.db")
    return {"run_dir": run_dir, "uri": uri, "first": first, "second": second, "leaves": catalogue_leaves(run_dir)}


def catalogue_leaves(run_dir) -> dict[str, str]:
    items = read_table(run_dir, "items", ["item_id", "category"])
    return dict(zip(items["item_id"].to_pylist(), (path[-1] for path in items["category"].to_pylist())))


def brute_force(queries, vectors, ids, k):
    """Each query's top k ids and cosine scores over `vectors`, in float64."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = q.astype(np.float64) @ vectors.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[ids[i] for i in row] for row in order], np.take_along_axis(scores, order, axis=1)


def queries_for(version, count=12, seed=0):
    """Some of the version's own item vectors and some random directions, unnormalised."""
    rng = np.random.default_rng(seed)
    own = version.vectors()[rng.choice(len(version), count // 2, replace=False)] * 3.0
    return np.vstack([own, rng.normal(size=(count - len(own), version.dim))]).astype(np.float32)


def assert_same_as_brute_force(found, scores, version, queries, k=K, keep=None):
    ids = version.item_ids()
    vectors = version.vectors()
    if keep is not None:
        rows = [i for i, item in enumerate(ids) if keep(item)]
        ids, vectors = [ids[i] for i in rows], vectors[rows]
    want_ids, want_scores = brute_force(queries, vectors, ids, k)
    assert found == want_ids
    np.testing.assert_allclose(scores[:, :len(want_ids[0])], want_scores, atol=1e-5)


def rows_in(uri, collection, ids):
    client = milvus_client(uri)
    try:
        return {row["item_id"]: row for row in client.query(collection, ids=list(ids),
                                                              output_fields=["item_id", "vector", "leaf"])}
    finally:
        client.close()


def count_in(uri, collection):
    client = milvus_client(uri)
    try:
        return client.query(collection, output_fields=["count(*)"], consistency_level="Strong")[0]["count(*)"]
    finally:
        client.close()


@pytest.fixture(scope="module")
def exported(world):
    """The first version exported under the default alias."""
    return export_version(world["run_dir"], world["first"].name, world["uri"])


def test_every_vector_and_leaf_round_trips(world, exported):
    first = world["first"]
    assert exported["collection"] == "moon_items__v1_stage2" and exported["action"] == "created"
    assert exported["alias"] == "moon_items" and exported["previous"] is None
    assert exported["count"] == len(first) == 200 and exported["dim"] == first.dim
    rows = rows_in(world["uri"], exported["collection"], first.item_ids())
    assert sorted(rows) == sorted(first.item_ids())
    got = np.array([rows[item]["vector"] for item in first.item_ids()], dtype=np.float32)
    np.testing.assert_allclose(got, first.vectors(), atol=1e-6)  # the store's float16, widened
    np.testing.assert_allclose(got, first.table()["vector"].to_numpy(zero_copy_only=False).tolist(), atol=2e-3)
    assert {item: row["leaf"] for item, row in rows.items()} == {i: world["leaves"][i] for i in first.item_ids()}


def test_search_equals_brute_force_cosine_top_k(world, exported):
    client = milvus_client(world["uri"])
    client.release_collection(exported["collection"])  # as a fresh Milvus Lite process finds it
    client.close()
    searcher = MilvusSearcher(world["uri"])
    queries = queries_for(world["first"])
    found, scores, answered_by = searcher.search(queries, K)
    assert answered_by == exported["collection"] == searcher.version()
    assert scores.dtype == np.float32 and scores.shape == (len(queries), K)
    assert_same_as_brute_force(found, scores, world["first"], queries)
    health = searcher.health()
    assert health["ok"] and health["store_version"] == "v1-stage2" and health["count"] == 200
    with pytest.raises(UserError, match=r"\(n, 32\)"):
        searcher.search(queries[:, :16], K)


def test_a_leaf_filter_returns_only_that_leafs_items(world, exported):
    leaves = world["leaves"]
    leaf = max(set(leaves.values()), key=list(leaves.values()).count)
    members = sum(1 for item in world["first"].item_ids() if leaves[item] == leaf)
    searcher = MilvusSearcher(world["uri"])
    queries = queries_for(world["first"], count=4, seed=1)
    found, scores, _ = searcher.search(queries, 5, leaf=leaf)
    assert_same_as_brute_force(found, scores, world["first"], queries, k=5, keep=lambda item: leaves[item] == leaf)

    # more than the leaf holds: a filtered graph search may stop short, and what it lacks is padded
    found, scores, _ = searcher.search(queries, members + 5, leaf=leaf)
    for row, row_scores in zip(found, scores):
        assert 5 <= len(row) <= members and {leaves[item] for item in row} == {leaf}
        assert np.isfinite(row_scores[:len(row)]).all() and np.isneginf(row_scores[len(row):]).all()
    nothing, empty, _ = searcher.search(queries, 3, leaf='no "such" \\ leaf')
    assert nothing == [[]] * len(queries) and np.isneginf(empty).all()


def test_the_alias_moves_to_a_second_version_and_each_search_is_answered_by_one_version(world):
    first, second, uri = world["first"], world["second"], world["uri"]
    export_version(world["run_dir"], first.name, uri, alias="switch")
    searcher = MilvusSearcher(uri, alias="switch")
    queries = queries_for(first, count=6, seed=2)
    seen, errors, stop, saw_second = [], [], threading.Event(), threading.Event()

    def keep_searching():
        while not stop.is_set():
            try:
                seen.append(searcher.search(queries, K))
            except Exception as exc:  # recorded: a failed search during the switch is a failure of the test
                errors.append(exc)
                return
            if seen[-1][2] == "switch__v2_stage1":
                saw_second.set()

    threads = [threading.Thread(target=keep_searching) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        moved = export_version(world["run_dir"], second.name, uri, alias="switch")
        saw_second.wait(timeout=30)
    finally:
        stop.set()
        for thread in threads:
            thread.join()

    assert moved["previous"] == "switch__v1_stage2" and moved["collection"] == "switch__v2_stage1"
    assert not errors
    versions = {"switch__v1_stage2": first, "switch__v2_stage1": second}
    assert {name for _, _, name in seen} == set(versions)
    for found, scores, name in seen:  # every answer is one version's whole answer
        assert_same_as_brute_force(found, scores, versions[name], queries)
    assert searcher.search(queries, K)[2] == "switch__v2_stage1"
    assert searcher.health()["store_version"] == "v2-stage1"


def test_exporting_again_skips_completes_or_replaces(world, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(world["run_dir"], run_dir, ignore=shutil.ignore_patterns("*.db"))
    uri, name = world["uri"], "again__v1_stage2"
    first = export_version(run_dir, "v1-stage2", uri, alias="again")
    assert first["action"] == "created"
    assert export_version(run_dir, "v1-stage2", uri, alias="again")["action"] == "current"
    assert count_in(uri, name) == 200

    stored = Store(run_dir).open("v1-stage2")  # the version gains items: the export completes it by upsert
    new = np.random.default_rng(3).normal(size=(5, stored.dim)).astype(np.float32)
    assert stored.add([f"late-{i}" for i in range(5)], new) == 5
    again = export_version(run_dir, "v1-stage2", uri, alias="again")
    assert again["action"] == "completed" and again["count"] == 205 and count_in(uri, name) == 205
    assert rows_in(uri, name, ["late-0"])["late-0"]["leaf"] == ""  # the catalogue does not list it

    manifest = stored.path / "manifest.json"  # the version made again from other vectors
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "created_at": "2031-01-01T00:00:00Z"}))
    with pytest.raises(UserError, match="alias again still serves it"):
        export_version(run_dir, "v1-stage2", uri, alias="again")
    assert export_version(run_dir, "v2-stage1", uri, alias="again")["previous"] == name
    replaced = export_version(run_dir, "v1-stage2", uri, alias="again")
    assert replaced["action"] == "replaced" and count_in(uri, name) == 205


def test_a_matryoshka_prefix_gets_a_collection_of_its_own(world):
    done = export_version(world["run_dir"], "v1-stage2", world["uri"], alias="short", dim=16)
    assert done["collection"] == "short__v1_stage2__d16" and done["dim"] == 16
    queries = queries_for(world["first"], count=4, seed=4)[:, :16]
    found, scores, _ = MilvusSearcher(world["uri"], alias="short").search(queries, K)
    ids = world["first"].item_ids()
    want_ids, want_scores = brute_force(queries, world["first"].vectors(16), ids, K)
    assert found == want_ids
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    with pytest.raises(UserError, match="--dim 12 is not a dimension"):
        export_version(world["run_dir"], "v1-stage2", world["uri"], alias="short", dim=12)


def test_moon_export_writes_and_says_what_it_wrote(world):
    runner = CliRunner()
    args = ["export", "--quiet", "--run-dir", str(world["run_dir"]), "--to", "milvus", world["uri"], "--version",
            "v2-stage1", "--alias", "cli_items", *STORE_OVERRIDES]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "v2-stage1: 200 items of 32 dims -> Milvus collection cli_items__v2_stage1" in result.output
    assert "alias cli_items -> cli_items__v2_stage1 (was unset)" in result.output
    missing = runner.invoke(cli, [*args[:7], "--version", "v9-stage2"])
    assert missing.exit_code == 2 and "store version v9-stage2 does not exist" in missing.output
    nowhere = runner.invoke(cli, [*args[:6], str(world["run_dir"] / "no" / "such.db")])
    assert nowhere.exit_code == 2 and "does not exist" in nowhere.output


def test_a_collection_moon_did_not_make_is_never_replaced(world):
    from pymilvus import MilvusClient

    client = MilvusClient(world["uri"])
    try:
        client.create_collection(collection_name("theirs", "v1-stage2", 32, 32), dimension=32)
    finally:
        client.close()
    with pytest.raises(UserError, match="was not made by `moon export`"):
        export_version(world["run_dir"], "v1-stage2", world["uri"], alias="theirs")


def test_a_missing_pymilvus_is_a_user_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pymilvus", None)  # import pymilvus now raises ImportError
    with pytest.raises(UserError, match=r"moon-embedding\[milvus\]"):
        milvus_client("anything.db")


def test_leaf_filters_quote_what_they_are_given():
    assert leaf_filter(None) == ""
    assert leaf_filter("dresses") == 'leaf == "dresses"'
    assert leaf_filter('a "b" \\ c') == 'leaf == "a \\"b\\" \\\\ c"'
    assert EXPORT_PROPERTY == "moon.export"
