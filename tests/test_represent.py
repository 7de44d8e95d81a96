"""`moon embed` of the behaviour log's queries, and versions made without a trained model: a version
holds one vector per distinct query of the log, each as the embedder gives it (photos through its
image path, texts through its text path); a killed query partition resumes; an incremental run adds
the queries a version lacks; the baseline version is the baseline embedder's vectors; the random
placebo is a function of (seed, id) alone; the oracle needs the simulated world's item truth."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from click.testing import CliRunner

from conftest import STORE_OVERRIDES, store_config
from moon.baseline import BaselineEmbedder
from moon.cli import cli
from moon.errors import UserError
from moon.io.tables import read_table
from moon.model.embedder import Embedder
from moon.model.inputs import Input
from moon.queries import PHOTO, distinct_queries, kind, query_ids
from moon.represent import embed_catalogue
from moon.represent.controls import RANDOM_DIM, TRUTH_WEIGHTS, random_vectors
from moon.run import RunDir
from moon.store.versions import Store, VersionBuilder
from moon.views import SERVED_VIEW

config = store_config


@pytest.fixture
def run_dir(log_world, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(log_world, copy)
    return copy


@pytest.fixture(scope="module")
def queries(log_world) -> pa.Table:
    """The log's distinct queries (query_id, query_text, query_image), in order of first appearance."""
    return pa.concat_tables(distinct_queries(log_world))


def photo_rows(queries: pa.Table) -> np.ndarray:
    return np.array([kind(q) == PHOTO for q in queries["query_id"].to_pylist()])


def test_embed_stores_one_vector_per_distinct_query_as_the_embedder_gives_it(run_dir, queries):
    version = embed_catalogue(config(), run_dir)
    events = read_table(run_dir, "events", columns=["query_text", "query_image"])
    every = set(query_ids(events["query_text"], events["query_image"]).to_pylist()) - {None}
    assert version.ids(of="queries") == queries["query_id"].to_pylist()
    assert set(version.ids(of="queries")) == every and version.count("queries") == len(every)  # each query once
    photo = photo_rows(queries)
    assert 0 < photo.sum() < len(photo)  # the tiny world searches with both
    assert len(version) == read_table(run_dir, "items").num_rows  # and the items are all there

    embedder = Embedder.load(RunDir(run_dir).model("stage2"))
    photos = [Input(None, image) for image in queries.filter(pa.array(photo))["query_image"].to_pylist()]
    texts = [Input(text, None) for text in queries.filter(pa.array(~photo))["query_text"].to_pylist()]
    for dim in (None, 16):  # the full vector and the Matryoshka prefix
        stored = version.vectors(dim, of="queries")
        np.testing.assert_allclose(stored[photo], embedder.encode(photos, dim=dim), atol=2e-3)
        np.testing.assert_allclose(stored[~photo], embedder.encode(texts, dim=dim), atol=2e-3)
    ids = version.ids(of="queries")
    np.testing.assert_array_equal(version.rows([ids[9], "sku00000000", ids[0]], of="queries"), [9, -1, 0])

    manifest = version.manifest
    assert manifest["queries"]["count"] == len(every) and len(manifest["queries"]["shards"]) == 8
    assert manifest["events_digest"] and "queries_absent" not in manifest
    assert embed_catalogue(config(), run_dir).name == version.name  # the same model, catalogue and log: current

    manifest_file = RunDir(run_dir).table("events") / "manifest.json"  # the log is rewritten
    manifest_file.write_text(json.dumps({**json.loads(manifest_file.read_text()), "rewritten": True}))
    again = embed_catalogue(config(), run_dir)
    assert again.name == "v2-stage2" and again.ids(of="queries") == ids


def test_a_killed_query_partition_resumes_with_only_the_missing_ones(run_dir, tmp_path, monkeypatch):
    straight_dir = tmp_path / "straight"
    shutil.copytree(run_dir, straight_dir)
    overrides = ("store.partitions=4",)
    written, real_write = [], VersionBuilder.write

    def killed_at_query_partition_2(self, p, ids, vectors, of="items"):
        if (of, p) == ("queries", 2):
            raise KeyboardInterrupt  # as a kill would stop it, leaving what it had written
        written.append((of, p))
        real_write(self, p, ids, vectors, of)

    monkeypatch.setattr(VersionBuilder, "write", killed_at_query_partition_2)
    with pytest.raises(KeyboardInterrupt):
        embed_catalogue(config(*overrides), run_dir)
    folder = Store(run_dir).path("v1-stage2")
    assert Store(run_dir).in_progress() == ["v1-stage2"] and not (folder / "manifest.json").exists()
    assert written == [("items", p) for p in range(4)] + [("queries", 0), ("queries", 1)]
    (folder / ".queries-part-00002.parquet.tmp-999999").write_bytes(b"half a shard")  # what a kill leaves

    written.clear()
    monkeypatch.setattr(VersionBuilder, "write",
                        lambda self, p, ids, vectors, of="items": (written.append((of, p)),
                                                                   real_write(self, p, ids, vectors, of)))
    resumed = embed_catalogue(config(*overrides), run_dir)
    assert written == [("queries", 2), ("queries", 3)]  # nothing done before is computed again
    assert resumed.name == "v1-stage2" and not list(folder.glob(".*.tmp-*"))

    straight = embed_catalogue(config(*overrides), straight_dir)
    assert resumed.ids(of="queries") == straight.ids(of="queries")
    np.testing.assert_allclose(resumed.vectors(of="queries"), straight.vectors(of="queries"), atol=2e-3)
    assert resumed.manifest["queries"] == straight.manifest["queries"]


def test_incremental_adds_the_queries_the_version_lacks(run_dir, queries, tmp_path):
    events = RunDir(run_dir).table("events")
    shutil.copytree(events, tmp_path / "all-events")
    for day in sorted(events.glob("part-*.parquet"))[3:]:  # the log of the first days only
        day.unlink()
    first = embed_catalogue(config(), run_dir)
    early = first.ids(of="queries")
    assert 0 < len(early) < queries.num_rows and early == queries["query_id"].to_pylist()[: len(early)]
    old = first.vectors(of="queries")

    shutil.rmtree(events)
    shutil.copytree(tmp_path / "all-events", events)  # the days since
    added = embed_catalogue(config(), run_dir, incremental=True)
    assert added.name == first.name and added.ids(of="queries")[: len(early)] == early
    assert sorted(added.ids(of="queries")) == sorted(queries["query_id"].to_pylist())
    np.testing.assert_array_equal(added.vectors(of="queries")[: len(early)], old)
    shards = [s["file"] for s in added.manifest["queries"]["shards"]]
    assert [file.startswith("queries-part-inc-") for file in shards] == [False] * 8 + [True]
    assert len(added) == len(first)  # no new items

    embedder = Embedder.load(RunDir(run_dir).model("stage2"))
    new = queries.filter(pc.invert(pc.is_in(queries["query_id"], pa.array(early))))
    new_rows = added.rows(new["query_id"].to_pylist(), of="queries")
    photo = photo_rows(new)
    photos = [Input(None, image) for image in new.filter(pa.array(photo))["query_image"].to_pylist()]
    np.testing.assert_allclose(added.vectors(of="queries")[new_rows[photo]], embedder.encode(photos), atol=2e-3)
    again = embed_catalogue(config(), run_dir, incremental=True)
    assert again.manifest["queries"] == added.manifest["queries"]  # nothing left to add


def test_random_vectors_are_a_function_of_seed_and_id_alone(run_dir, queries):
    ids = [f"sku{i:05d}" for i in range(50)]
    vectors = random_vectors(ids, seed=0)
    assert vectors.shape == (50, RANDOM_DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(random_vectors(ids[::-1], seed=0), vectors[::-1])  # whatever the order
    np.testing.assert_array_equal(random_vectors(ids[7:9], seed=0), vectors[7:9])
    assert not np.allclose(random_vectors(ids, seed=1), vectors)
    assert np.abs(vectors @ vectors.T - np.eye(50)).max() < 0.7  # distinct ids, unrelated directions

    version = embed_catalogue(config("store.partitions=3"), run_dir, model="random")
    assert version.name == "v1-random" and version.dim == RANDOM_DIM and version.matryoshka_dims == []
    np.testing.assert_allclose(version.vectors(), random_vectors(version.ids(), seed=0), atol=2e-3)
    np.testing.assert_allclose(version.vectors(of="queries"), random_vectors(queries["query_id"].to_pylist(), seed=0),
                               atol=2e-3)
    assert embed_catalogue(config("store.partitions=3"), run_dir, model="random").name == "v1-random"  # reused
    other = embed_catalogue(config("store.partitions=3", "seed=1"), run_dir, model="random")
    assert other.name == "v2-random" and not np.allclose(other.vectors(), version.vectors(), atol=0.1)

    shutil.rmtree(RunDir(run_dir).table("events"))  # a run without a log: items only
    items_only = embed_catalogue(config("store.partitions=3"), run_dir, model="random")
    assert items_only.name == "v3-random" and items_only.count("queries") == 0 and "queries" not in items_only.manifest
    assert items_only.manifest["events_digest"] is None
    np.testing.assert_array_equal(items_only.vectors(), version.vectors())


def test_the_oracle_is_the_worlds_truth_and_needs_it(run_dir, queries):
    version = embed_catalogue(config(), run_dir, model="truth")
    manifest = version.manifest
    assert version.name == "v1-truth" and "queries_absent" not in manifest and manifest["matryoshka_dims"] == []
    assert manifest["weights"] == TRUTH_WEIGHTS and version.dim == manifest["style_dims"] + sum(
        len(values) for values in manifest["codes"].values())

    items = read_table(run_dir, "items", columns=["item_id", "category"])
    truth = read_table(run_dir, "item_truth").to_pylist()
    assert [row["item_id"] for row in truth] == version.ids() == items["item_id"].to_pylist()
    leaves = np.array([path[-1] for path in items["category"].to_pylist()])
    facts = [json.dumps({k: v for k, v in row.items() if k not in ("item_id", "is_new")}) for row in truth]
    vectors = version.vectors()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    cosine = vectors @ vectors.T
    same_leaf = leaves[:, None] == leaves[None, :]
    same_facts = (np.array(facts)[:, None] == np.array(facts)[None, :]) & same_leaf
    assert (same_facts & ~np.eye(len(facts), dtype=bool)).any()  # size variants: one truth, one vector
    assert cosine[same_facts].min() > 0.99
    assert cosine[same_leaf].mean() > cosine[~same_leaf].mean() + 0.25  # the leaf leads, as in true relevance

    # Queries: a photo is the item photographed; a text keeps the leaf and the facts it names,
    # so no item of another leaf matches it as well as the item in mind, and it says nothing of the look.
    by_item = dict(zip(version.ids(), vectors))
    in_mind = read_table(run_dir, "query_truth").to_pandas().set_index("query_id").item_id
    assert version.ids(of="queries") == queries["query_id"].to_pylist()
    style = slice(len(manifest["codes"]["leaf"]), len(manifest["codes"]["leaf"]) + manifest["style_dims"])
    leaf_of = dict(zip(version.ids(), leaves))
    for query, vector in zip(version.ids(of="queries"), version.vectors(of="queries")):
        item = by_item[in_mind[query]]
        if query.startswith("p"):
            np.testing.assert_allclose(vector, item, atol=2e-3)
        else:
            other_leaves = leaves != leaf_of[in_mind[query]]
            assert not vector[style].any() and item @ vector > (vectors[other_leaves] @ vector).max()

    shutil.rmtree(RunDir(run_dir).table("query_truth"))  # a world simulated before query truth: items only
    older = embed_catalogue(config(), run_dir, model="truth")
    assert older.count("queries") == 0 and "has no query_truth table" in older.manifest["queries_absent"]

    shutil.rmtree(RunDir(run_dir).table("item_truth"))  # a world that was not simulated
    with pytest.raises(UserError, match="needs the simulated world's item_truth table"):
        embed_catalogue(config(), run_dir, model="truth")


def test_the_baseline_version_holds_the_baseline_embedders_vectors(run_dir, queries):
    version = embed_catalogue(config(), run_dir, model="baseline")
    items = read_table(run_dir, "items")
    baseline = BaselineEmbedder.fit(items)  # as `moon eval retrieval` fits it
    assert version.name == "v1-baseline" and version.dim == baseline.dim and version.matryoshka_dims == []
    assert version.manifest["item_view"] == SERVED_VIEW and version.manifest["model"] == "baseline"
    np.testing.assert_allclose(version.vectors(), baseline.encode_items(items, SERVED_VIEW), atol=2e-3)

    photo = photo_rows(queries)
    stored = version.vectors(of="queries")
    np.testing.assert_allclose(stored[photo], baseline.encode_images(queries.filter(pa.array(photo))["query_image"]
                                                                     .to_pylist()), atol=2e-3)
    np.testing.assert_allclose(stored[~photo], baseline.encode_texts(queries.filter(pa.array(~photo))["query_text"]
                                                                     .to_pylist()), atol=2e-3)
    assert np.abs(stored[~photo]).sum(axis=1).min() > 0  # the text queries' words are the catalogue's
    assert (version.path / "baseline" / "baseline.pkl").is_file()  # the fit it was made with, for later adds
    assert embed_catalogue(config(), run_dir, model="baseline").name == "v1-baseline"

    with pytest.raises(UserError, match="is not the model that made"):
        embed_catalogue(config(), run_dir, model="random", incremental=True)
    assert embed_catalogue(config(), run_dir, incremental=True).count("queries") == version.count("queries")
    (version.path / "baseline" / "baseline.pkl").unlink()  # a new fit would not match the stored vectors
    with pytest.raises(UserError, match="lost the baseline fit"):
        embed_catalogue(config(), run_dir, incremental=True)


def test_moon_embed_names_what_it_stored_and_refuses_the_oracle_without_a_simulated_world(run_dir):
    command = ["embed", "--quiet", "--run-dir", str(run_dir), *STORE_OVERRIDES]
    result = CliRunner().invoke(cli, [*command, "--model", "random"])
    assert result.exit_code == 0, result.output
    count = Store(run_dir).open("v1-random").count("queries")
    assert count > 0 and f"240 items, {count:,} queries" in result.output

    shutil.rmtree(RunDir(run_dir).table("item_truth"))
    refused = CliRunner().invoke(cli, [*command, "--model", "truth"])
    assert refused.exit_code == 2 and refused.exception.__class__ is SystemExit
    assert "needs the simulated world's item_truth table" in refused.output
