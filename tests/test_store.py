"""The representation store: a version round-trips float16 vectors of items and of queries, a version
written before queries were stored still opens, a killed `moon embed` resumes with only its
missing partitions, an incremental run adds exactly the new items, and two real torchrun
processes store what one process stores."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import STORE_ITEMS, STORE_OVERRIDES, free_port, publish_untrained, store_config, write_items
from moon.config import load_config
from moon.errors import UserError
from moon.io.tables import read_table
from moon.model.embedder import Embedder
from moon.model.views import ItemViews
from moon.queries import query_id
from moon.represent import embed_catalogue
from moon.run import RunDir
from moon.store.versions import Store, VersionBuilder, checkpoint_digest, write_shard
from moon.vectors import unit_rows
from moon.views import SERVED_VIEW as ITEM_VIEW

ITEMS = STORE_ITEMS  # the first rows of the tiny world's catalogue; the rest arrive "later"
OVERRIDES = STORE_OVERRIDES
config = store_config


@pytest.fixture(scope="module")
def expected(store_world):
    """The embedder's own output for every catalogue item in the served view, full and 16 dims."""
    embedder = Embedder.load(RunDir(store_world).model("stage2"))
    inputs = ItemViews(read_table(store_world, "items")).inputs(range(ITEMS), ITEM_VIEW)
    return embedder.encode(inputs), embedder.encode(inputs, dim=16)


@pytest.fixture
def run_dir(store_world, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(store_world, copy)
    return copy


def test_a_version_round_trips_float16_vectors_and_matryoshka_prefixes(run_dir, expected):
    version = embed_catalogue(config(), run_dir)
    assert version.name == "v1-stage2" and version.path == run_dir / "store" / "v1-stage2"
    manifest = json.loads((version.path / "manifest.json").read_text())
    assert manifest["count"] == ITEMS and manifest["dtype"] == "float16" and manifest["item_view"] == ITEM_VIEW
    assert manifest["dims"] == 32 and manifest["matryoshka_dims"] == [16] and manifest["partitions"] == 8
    assert manifest["model"] == "stage2"
    assert manifest["checkpoint_digest"] == checkpoint_digest(RunDir(run_dir).model("stage2"))
    assert [s["file"] for s in manifest["shards"]] == [f"part-{p:05d}.parquet" for p in range(8)]
    assert sum(s["count"] for s in manifest["shards"]) == ITEMS
    assert str(pq.read_schema(version.path / "part-00003.parquet").field("vector").type) in (
        "fixed_size_list<element: halffloat>[32]", "fixed_size_list<item: halffloat>[32]")

    assert version.item_ids() == read_table(run_dir, "items")["item_id"].to_pylist()
    full, prefix = expected
    vectors = version.vectors()
    assert vectors.dtype == np.float32 and vectors.shape == (ITEMS, 32)
    np.testing.assert_allclose(vectors, full, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(version.vectors(16), prefix, atol=2e-3)  # the prefix, re-normalised
    np.testing.assert_allclose(np.linalg.norm(version.vectors(16), axis=1), 1.0, atol=1e-6)

    ids = version.item_ids()
    # the same stored rows, re-normalised on their own (the last bit of a float32 may differ)
    np.testing.assert_allclose(version.lookup([ids[7], ids[3]], dim=16), version.vectors(16)[[7, 3]], rtol=0, atol=1e-6)
    with pytest.raises(KeyError, match="not in store version"):
        version.lookup(["no-such-item"])
    with pytest.raises(UserError, match="dim=8"):
        version.vectors(8)

    again = embed_catalogue(config(), run_dir)  # same model, same catalogue: the version is current
    assert again.name == "v1-stage2" and Store(run_dir).versions() == ["v1-stage2"]
    other = embed_catalogue(config("store.partitions=3"), run_dir)  # another partitioning: a new version
    assert other.name == "v2-stage2" and Store(run_dir).latest().name == "v2-stage2"
    # other batches round a float32 differently now and then: at most one float16 step apart
    np.testing.assert_allclose(other.vectors(), vectors, rtol=0, atol=1e-3)
    with pytest.raises(UserError, match="no stage1 model"):
        embed_catalogue(config(), run_dir, model="stage1")


HAND_PLAN = {"model": "hand", "checkpoint_digest": "0123", "dims": 8, "matryoshka_dims": [4], "dtype": "float16",
             "partitions": 3, "items": 10}


def test_a_version_holds_query_vectors_beside_its_items_in_shards_of_their_own(tmp_path):
    rng = np.random.default_rng(0)
    item_ids = [f"sku{i:03d}" for i in range(10)]
    query_ids = [query_id(f"red dress {i}", None) for i in range(4)] + [query_id(None, bytes([i])) for i in range(3)]
    items, queries = rng.standard_normal((10, 8)), rng.standard_normal((7, 8))
    builder = Store(tmp_path).begin(HAND_PLAN, new_plan=lambda: {"queries": {"count": 7}})
    assert builder.kinds() == ["items", "queries"] and builder.missing("queries") == [0, 1, 2]
    for of, ids, vectors in (("items", item_ids, items), ("queries", query_ids, queries)):
        for p in range(3):
            start, stop = builder.bounds(p, of)
            builder.write(p, ids[start:stop], vectors[start:stop], of)
    assert builder.missing("queries") == [] and builder.missing("items") == []
    version = builder.finish()

    manifest = json.loads((version.path / "manifest.json").read_text())
    assert manifest["count"] == 10
    assert [s["file"] for s in manifest["shards"]] == [f"part-0000{p}.parquet" for p in range(3)]
    assert manifest["queries"]["count"] == 7
    assert [s["file"] for s in manifest["queries"]["shards"]] == [f"queries-part-0000{p}.parquet" for p in range(3)]
    assert pq.read_schema(version.path / "queries-part-00001.parquet").names == ["query_id", "vector"]
    vector_type = pq.read_schema(version.path / "queries-part-00001.parquet").field("vector").type
    assert str(vector_type).endswith("halffloat>[8]")

    assert version.ids() == version.item_ids() == item_ids and version.ids(of="queries") == query_ids
    assert len(version) == version.count() == 10 and version.count("queries") == 7
    np.testing.assert_allclose(version.vectors(), unit_rows(items), atol=2e-3)
    np.testing.assert_allclose(version.vectors(of="queries"), unit_rows(queries), atol=2e-3)
    np.testing.assert_allclose(version.vectors(4, of="queries"), unit_rows(queries[:, :4]), atol=3e-3)  # the prefix
    assert version.vectors(of="queries").dtype == np.float32
    np.testing.assert_array_equal(version.rows([query_ids[5], "t-unknown", query_ids[0]], of="queries"), [5, -1, 0])
    np.testing.assert_array_equal(version.rows([query_ids[5], item_ids[2]]), [-1, 2])  # the kinds never mix
    np.testing.assert_array_equal(version.lookup([query_ids[6]], 4, of="queries"),
                                  version.vectors(4, of="queries")[[6]])
    with pytest.raises(KeyError, match="query ids are not in store version"):
        version.lookup(["t-unknown"], of="queries")

    # queries added later: one more shard of their own, old rows and the items untouched; a stale
    # query shard (an add killed before its manifest update) is invisible and removed
    stale = version.path / "queries-part-inc-19990101T000000000000Z.parquet"
    shutil.copy(version.path / "queries-part-00000.parquet", stale)
    assert version.add([query_id("blue shoes", None), query_ids[0]], rng.standard_normal((2, 8)), of="queries") == 1
    assert not stale.exists() and version.count("queries") == 8
    assert version.ids(of="queries")[-1] == query_id("blue shoes", None)
    np.testing.assert_allclose(version.vectors(of="queries")[:7], unit_rows(queries), atol=2e-3)
    assert version.manifest["shards"] == manifest["shards"] and len(version) == 10
    reopened = Store(tmp_path).open(version.name)
    assert reopened.ids(of="queries") == version.ids(of="queries") and reopened.ids() == item_ids


def test_a_version_written_before_queries_were_stored_still_opens(tmp_path):
    folder = tmp_path / "store" / "v1-stage2"
    folder.mkdir(parents=True)
    write_shard(folder / "part-00000.parquet", ["a", "b"], np.eye(2, 8))
    plan = {"version": "v1-stage2", **HAND_PLAN, "partitions": 1, "items": 2, "items_digest": "4567",
            "item_view": ITEM_VIEW, "bidirectional": True}  # as versions were planned before: no log
    (folder / "plan.json").write_text(json.dumps(plan))
    manifest = {**plan, "count": 2, "shards": [{"file": "part-00000.parquet", "count": 2}], "created_at": "then"}
    (folder / "manifest.json").write_text(json.dumps(manifest))

    version = Store(tmp_path).latest()
    assert version.ids() == ["a", "b"] and version.ids(of="queries") == [] and version.count("queries") == 0
    assert version.vectors().shape == (2, 8) and version.vectors(4, of="queries").shape == (0, 4)
    np.testing.assert_array_equal(version.rows(["b", "a"]), [1, 0])
    np.testing.assert_array_equal(version.rows(["a"], of="queries"), [-1])
    builder = Store(tmp_path).builder("v1-stage2")
    assert builder.kinds() == ["items"] and builder.missing("queries") == [] and builder.count("queries") == 0
    with pytest.raises(ValueError, match="a store version holds"):
        version.ids(of="users")

    assert version.add(["tq1"], np.ones((1, 8)), of="queries") == 1  # its first queries, added later
    assert version.count("queries") == 1 and version.ids() == ["a", "b"] and len(version) == 2


# Runs `moon embed`, but the second shard write hangs after writing its temporary file and
# before the rename: the test kills the process there, as a crash or a pre-emption would.
KILLED_IN_SECOND_SHARD = """
import sys, time
import pyarrow.parquet as pq
real, calls = pq.write_table, []
def write_then_hang(*args, **kwargs):
    real(*args, **kwargs)
    calls.append(1)
    if len(calls) == 2:
        time.sleep(600)
pq.write_table = write_then_hang
from moon.cli import main
main()
"""


def test_a_killed_run_resumes_with_only_its_missing_partitions(run_dir, tmp_path, monkeypatch):
    straight_dir = tmp_path / "straight"
    shutil.copytree(run_dir, straight_dir)
    overrides = [*OVERRIDES, "store.partitions=10"]
    command = [sys.executable, "-c", KILLED_IN_SECOND_SHARD, "embed", "--quiet", "--run-dir", str(run_dir), *overrides]
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    folder = run_dir / "store" / "v1-stage2"
    deadline = time.monotonic() + 240
    while not ((folder / "part-00000.parquet").exists() and list(folder.glob(".part-*.tmp-*"))):
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the embed process never wrote its second shard"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)

    assert sorted(p.name for p in folder.glob("part-*.parquet")) == ["part-00000.parquet"]  # nothing half-written
    assert pq.read_metadata(folder / "part-00000.parquet").num_rows == ITEMS // 10
    assert list(folder.glob(".part-00001.parquet.tmp-*"))  # the shard it was writing is only a temporary file
    store = Store(run_dir)
    assert store.versions() == [] and store.in_progress() == ["v1-stage2"]
    with pytest.raises(UserError, match="no finished"):
        store.latest()
    first = (folder / "part-00000.parquet").stat()

    written, real_write = [], VersionBuilder.write
    monkeypatch.setattr(VersionBuilder, "write",
                        lambda self, p, *a, **k: (written.append(p), real_write(self, p, *a, **k)))
    resumed = embed_catalogue(load_config(None, overrides), run_dir)
    assert written == list(range(1, 10))  # the first shard is not computed again
    kept = (folder / "part-00000.parquet").stat()
    assert (kept.st_ino, kept.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    assert resumed.name == "v1-stage2" and not list(folder.glob(".*.tmp-*"))

    straight = embed_catalogue(load_config(None, overrides), straight_dir)
    assert resumed.item_ids() == straight.item_ids()
    np.testing.assert_allclose(resumed.vectors(), straight.vectors(), atol=2e-3)
    assert resumed.manifest["shards"] == straight.manifest["shards"]


def test_incremental_adds_exactly_the_new_items_and_keeps_the_old_vectors(run_dir, tiny_world):
    first = embed_catalogue(config(), run_dir)
    old_ids, old_vectors = first.item_ids(), first.vectors()
    old_shards = {p.name: p.stat().st_mtime_ns for p in first.path.glob("part-*.parquet")}

    catalogue = read_table(tiny_world, "items")
    write_items(run_dir, catalogue)  # the catalogue now has the launched items too
    added = embed_catalogue(config(), run_dir, incremental=True)
    assert added.name == "v1-stage2" and Store(run_dir).versions() == ["v1-stage2"]
    assert len(added) == catalogue.num_rows and added.manifest["count"] == catalogue.num_rows
    ids = added.item_ids()
    assert ids[:ITEMS] == old_ids and ids[ITEMS:] == catalogue["item_id"].to_pylist()[ITEMS:]
    np.testing.assert_array_equal(added.vectors()[:ITEMS], old_vectors)
    assert {p.name: p.stat().st_mtime_ns for p in added.path.glob("part-0*.parquet")} == old_shards
    increments = [s for s in added.manifest["shards"] if s["file"].startswith("part-inc-")]
    assert [s["count"] for s in increments] == [catalogue.num_rows - ITEMS]

    embedder = Embedder.load(RunDir(run_dir).model("stage2"))
    new_inputs = ItemViews(catalogue).inputs(range(ITEMS, catalogue.num_rows), ITEM_VIEW)
    np.testing.assert_allclose(added.vectors()[ITEMS:], embedder.encode(new_inputs), atol=2e-3)

    # a shard left by an add killed before its manifest update is invisible, and nothing is left to add
    shutil.copy(added.path / increments[0]["file"], added.path / "part-inc-19990101T000000000000Z.parquet")
    again = embed_catalogue(config(), run_dir, incremental=True)
    assert len(again) == catalogue.num_rows and again.manifest["shards"] == added.manifest["shards"]

    publish_untrained(run_dir, "stage1", seed=1)  # another model must not add to stage 2's version
    with pytest.raises(UserError, match="is not the model that made"):
        embed_catalogue(config(), run_dir, model="stage1", incremental=True)


def test_two_torchrun_processes_store_what_one_process_stores(run_dir, tmp_path):
    single_dir = tmp_path / "single"
    shutil.copytree(run_dir, single_dir)
    overrides = [*OVERRIDES, "store.partitions=5"]  # uneven: rank 0 takes three partitions, rank 1 two
    single = embed_catalogue(load_config(None, overrides), single_dir)

    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "moon", "embed", "--quiet", "--run-dir", str(run_dir), *overrides,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("store version") == 1 and f"{ITEMS:,} items" in result.stdout

    both = Store(run_dir).latest()
    assert both.manifest["processes"] == 2 and both.manifest["shards"] == single.manifest["shards"]
    assert both.item_ids() == single.item_ids()
    np.testing.assert_allclose(both.vectors(), single.vectors(), atol=2e-3)


def test_embed_needs_a_model(tiny_world, tmp_path):
    write_items(tmp_path, read_table(tiny_world, "items").slice(0, 10))
    with pytest.raises(UserError, match="no trained model"):
        embed_catalogue(config(), tmp_path)
    with pytest.raises(UserError, match="no finished representation store version"):
        embed_catalogue(config(), tmp_path, incremental=True)


def test_a_model_embeds_as_it_was_saved_whatever_the_loading_run_says(run_dir, expected):
    """The stage-2 model was saved bidirectional: a run configured causal still stores its bidirectional
    vectors, and says so, because a model's attention belongs to the model, not to whoever loads it."""
    saved = json.loads((RunDir(run_dir).model("stage2") / "moon_model.json").read_text())
    assert saved["bidirectional"] is True
    causal = Embedder.load(RunDir(run_dir).model("stage2"))
    causal.backbone.language_model.config.is_causal = True  # what the same weights give under causal attention
    inputs = ItemViews(read_table(run_dir, "items")).inputs(range(ITEMS), ITEM_VIEW)
    assert not np.allclose(causal.encode(inputs), expected[0], atol=1e-3)  # so the test can tell them apart

    version = embed_catalogue(config("model.bidirectional=false"), run_dir)
    assert version.manifest["bidirectional"] is True
    np.testing.assert_allclose(version.vectors(), expected[0], atol=2e-3)  # float16 storage
