"""Labelled query sets a user brings in (`moon ingest-queries`): ingest and rejects, stage-1 pairs, and
recall of the test split beside the simulated query sets."""

import csv
import io
import json
import shutil

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import TINY_MODEL, TINY_WORLD
from moon.cli import cli
from moon.config import load_config
from moon.eval.retrieval import QuerySets, Vectors, evaluate, print_results
from moon.io.schema import LABELLED_REJECT_REASONS
from moon.io.tables import read_manifest, read_table
from moon.pairs.build import build_pairs, is_current, pairs_digest
from moon.report import recall as recall_section
from moon.run import RunDir
from moon.sources.labelled import default_split, ingest_queries
from moon.train import posttrain

SPLIT_DAYS = ["pairs.valid_days=1", "pairs.test_days=2"]


def config(*overrides):
    return load_config(None, [*TINY_WORLD, *TINY_MODEL, *SPLIT_DAYS, "name=tiny", *overrides])


def png(side: int, colour=(200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_csv(path, rows, columns=("query_id", "query_text", "query_image", "item_ids", "split")):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def catalogue_run(world, run_dir):
    """A run directory holding only the world's catalogue: labelled queries name its items."""
    shutil.copytree(RunDir(world).table("items"), RunDir(run_dir).table("items"))
    return run_dir


def items_of(run_dir, n):
    items = read_table(run_dir, "items", columns=["item_id", "title", "image"]).slice(0, n)
    return items["item_id"].to_pylist(), items["title"].to_pylist(), items["image"].to_pylist()


# ---------------------------------------------------------------- ingest


def test_ingest_keeps_good_rows_and_rejects_each_bad_one_with_its_reason(tiny_world, tmp_path):
    run_dir = catalogue_run(tiny_world, tmp_path / "run")
    (a, b, c), _, _ = items_of(run_dir, 3)
    folder = tmp_path / "set"
    (folder / "photos").mkdir(parents=True)
    (folder / "photos" / "good.png").write_bytes(png(20))
    (folder / "photos" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "photos" / "huge.png").write_bytes(png(40))  # 1,600 pixels, over the limit set below
    absolute = tmp_path / "elsewhere.png"
    absolute.write_bytes(png(16, (10, 200, 10)))
    rows = [
        ("", "", "photos/good.png", f"{a}|{b}", "train"),  # kept: a photo, two items
        ("", "red dress", "", f'["{c}"]', "Test"),  # kept: a text, a JSON list, any case of split
        ("q-both", "blue shirt", str(absolute), f"{a};{c}", ""),  # kept: both, absolute path, default split
        ("", "", "photos/absent.png", a, "train"),  # missing_image
        ("", "", "photos/broken.jpg", a, "train"),  # corrupt_image
        ("", "", "photos/huge.png", a, "train"),  # image_too_large
        ("", "", "", a, "train"),  # no_query
        ("", "green hat", "", " | ", "train"),  # no_items
        ("", "black shoe", "", f"{a}|no-such-item", "train"),  # unknown_item
        ("", "white bag", "", a, "validation"),  # bad_split
        ("q-both", "other text", "", a, "train"),  # duplicate_id
        ("", "grey coat", "", "[not json", "train"),  # malformed_line (the item list)
    ]
    path = write_csv(folder / "labelled.csv", rows)
    with open(path, "a") as handle:
        handle.write("only,three,fields\n")  # malformed_line (the row)
    summary = ingest_queries(path, config("ingest.max_image_pixels=1000"), run_dir)

    assert (summary.kept, summary.splits["train"] + summary.splits["test"]) == (3, 3)
    assert summary.rejected_by_reason == {reason: 2 if reason == "malformed_line" else 1
                                          for reason in LABELLED_REJECT_REASONS}
    table = read_table(run_dir, "labelled_queries").to_pylist()
    photo, text, both = table
    assert photo["item_ids"] == [a, b] and photo["split"] == "train" and photo["query_text"] is None
    assert photo["query_id"].startswith("p") and photo["row"] == 2
    assert text["item_ids"] == [c] and text["split"] == "test" and text["query_image"] is None
    assert both["query_id"] == "q-both" and both["query_text"] == "blue shirt" and both["split"] in ("train", "test")
    assert Image.open(io.BytesIO(both["query_image"])).size == (16, 16)

    rejects = pq.read_table(RunDir(run_dir).labelled_rejects).to_pylist()
    by_reason = {reject["reason"]: reject for reject in rejects}
    assert by_reason["unknown_item"]["item_id"] == "no-such-item" and by_reason["unknown_item"]["row"] == 10
    assert "absent.png" in by_reason["missing_image"]["detail"]
    assert not RunDir(run_dir).rejects.exists()  # the catalogue's rejects are never touched
    manifest = read_manifest(run_dir, "labelled_queries")
    assert manifest["simulated"] is False and manifest["labelled"] is True
    assert manifest["kinds"] == {"image": 1, "text": 1, "text+image": 1}


def test_jsonl_rows_take_lists_and_a_bad_line_never_stops_the_ingest(tiny_world, tmp_path):
    run_dir = catalogue_run(tiny_world, tmp_path / "run")
    (a, b), _, _ = items_of(run_dir, 2)
    lines = [json.dumps({"query_text": "red dress", "item_ids": [a, b], "split": "test"}), "{not json",
             json.dumps(["a", "list"]), json.dumps({"query_text": "blue shirt", "item_ids": []})]
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(lines) + "\n")
    summary = ingest_queries(path, config(), run_dir)
    assert summary.kept == 1 and summary.rejected_by_reason["malformed_line"] == 2
    assert summary.rejected_by_reason["no_items"] == 1
    assert read_table(run_dir, "labelled_queries")["item_ids"].to_pylist() == [[a, b]]


def test_a_query_without_a_split_gets_one_by_a_hash_of_itself_at_the_configured_share():
    ids = [f"t{n:015x}" for n in range(4000)]
    test = [default_split(key, 0.25) == "test" for key in ids]
    assert abs(np.mean(test) - 0.25) < 0.03
    assert [default_split(key, 0.25) for key in ids[:50]] == [default_split(key, 0.25) for key in ids[:50]]
    assert {default_split(key, 0.0) for key in ids} == {"train"} and {default_split(key, 1.0) for key in ids} == {"test"}


def test_the_command_needs_a_catalogue_and_a_known_file_and_says_what_it_replaces(tiny_world, tmp_path):
    (a,), _, _ = items_of(tiny_world, 1)
    path = write_csv(tmp_path / "set.csv", [("", "red dress", "", a, "train")])
    runner = CliRunner()
    empty = runner.invoke(cli, ["ingest-queries", str(path), "--run-dir", str(tmp_path / "empty")])
    assert empty.exit_code == 2 and "no items table" in empty.output

    run_dir = catalogue_run(tiny_world, tmp_path / "run")
    first = runner.invoke(cli, ["ingest-queries", str(path), "--run-dir", str(run_dir), "--quiet"])
    assert first.exit_code == 0, first.output
    assert "replaced" not in first.output
    again = write_csv(tmp_path / "again.csv", [("", "red dress", "", a, "train"), ("", "blue shirt", "", a, "test")])
    second = runner.invoke(cli, ["ingest-queries", str(again), "--run-dir", str(run_dir), "--quiet"])
    assert second.exit_code == 0, second.output
    assert "replaced the labelled set" in second.output and f"1 queries from {path.resolve()}" in second.output
    assert read_manifest(run_dir, "labelled_queries")["rows"] == 2

    useless = write_csv(tmp_path / "useless.csv", [("", "", "", a, "train")])
    failed = runner.invoke(cli, ["ingest-queries", str(useless), "--run-dir", str(run_dir)])
    assert failed.exit_code == 2 and "no_query" in failed.output and "unchanged" in failed.output
    assert read_manifest(run_dir, "labelled_queries")["rows"] == 2  # the set it had is kept
    wrong = write_csv(tmp_path / "wrong.csv", [("x",)], columns=("title",))
    assert runner.invoke(cli, ["ingest-queries", str(wrong), "--run-dir", str(run_dir)]).exit_code == 2
    assert runner.invoke(cli, ["ingest-queries", str(tmp_path / "set.txt"), "--run-dir", str(run_dir)]).exit_code == 2


# ---------------------------------------------------------------- pairs and evaluation


LABELLED_ITEMS = 12  # the first items of the catalogue: even rows train, odd rows test


def labelled_set(run_dir, folder):
    """A photo query (the item's own image) and a text query (its title) per item; the photo of the
    last test item also judges the first item a hit."""
    ids, titles, images = items_of(run_dir, LABELLED_ITEMS)
    (folder / "photos").mkdir(parents=True)
    rows = []
    for n, (item, title, image) in enumerate(zip(ids, titles, images)):
        (folder / "photos" / f"{n}.png").write_bytes(image)
        split = "train" if n % 2 == 0 else "test"
        judged = f"{item}|{ids[0]}" if n == LABELLED_ITEMS - 1 else item
        rows += [(f"photo-{n}", "", f"photos/{n}.png", judged, split), (f"text-{n}", title, "", item, split)]
    return write_csv(folder / "labelled.csv", rows)


@pytest.fixture(scope="module")
def labelled_run(log_world, tmp_path_factory):
    """The tiny world with a labelled set, its pairs built."""
    run_dir = tmp_path_factory.mktemp("labelled")
    shutil.copytree(log_world, run_dir, dirs_exist_ok=True)
    ingest_queries(labelled_set(run_dir, run_dir / "set"), config(), run_dir)
    build_pairs(config("pairs.labelled_weight=5", "pairs.labelled_item_view=title+image"), run_dir)
    return run_dir


def test_both_stages_gain_the_train_split_as_pairs_of_its_task_and_weight(labelled_run):
    stage1 = read_table(labelled_run, "pairs_stage1")
    labelled = stage1.filter(pc.equal(stage1["action"], "labelled")).to_pylist()
    ids, _, _ = items_of(labelled_run, LABELLED_ITEMS)
    train_items = sorted(ids[0::2])
    assert sorted(p["pos_item_id"] for p in labelled if p["task"] == "image->title+image") == train_items
    assert sorted(p["pos_item_id"] for p in labelled if p["task"] == "text->title+image") == train_items
    assert {(p["weight"], p["split"], p["item_view"]) for p in labelled} == {(5.0, "train", "title+image")}
    assert all(p["query_image"] is not None and p["query_text"] is None
               for p in labelled if p["query_view"] == "image")
    assert all(p["query_text"] is not None for p in labelled if p["query_view"] == "text")
    assert not any(p["session_id"].startswith(("photo-", "text-")) and p["split"] != "train"
                   for p in stage1.to_pylist())  # the test split never becomes a pair

    stats = json.loads(RunDir(labelled_run).pairs_stats.read_text())
    step = next(s for s in stats["steps"] if s["name"] == "labelled image->title+image")
    assert (step["rows_in"], step["kept"]) == (LABELLED_ITEMS + 1, LABELLED_ITEMS // 2)
    assert stats["totals"]["labelled queries"]["test queries"] == LABELLED_ITEMS  # six photos, six texts
    assert stats["totals"]["pairs_stage1"]["task text->title+image"] >= LABELLED_ITEMS // 2
    # stage 2 keeps them too, so that it does not unlearn what people judged
    stage2 = read_table(labelled_run, "pairs_stage2")
    again = stage2.filter(pc.equal(stage2["action"], "labelled")).to_pylist()
    assert sorted((p["task"], p["pos_item_id"]) for p in again) == sorted((p["task"], p["pos_item_id"]) for p in labelled)
    step = next(s for s in stats["steps"] if s["name"] == "labelled image->title+image" and s["stage"] == "stage 2")
    assert step["kept"] == LABELLED_ITEMS // 2


def test_a_zero_weight_leaves_the_labelled_pairs_out_and_says_so(labelled_run, tmp_path):
    run_dir = shutil.copytree(labelled_run, tmp_path / "run")
    accounting = build_pairs(config("pairs.labelled_weight=0"), run_dir)
    assert "labelled" not in read_table(run_dir, "pairs_stage1")["action"].to_pylist()
    step = next(s for s in accounting.steps if s.name == "labelled text->richer-text+image")
    assert step.kept == 0 and step.dropped["pairs.labelled_weight is 0"] == LABELLED_ITEMS // 2


def test_the_pairs_and_the_models_follow_the_labelled_set(labelled_run, tmp_path):
    settings = config("pairs.labelled_weight=5", "pairs.labelled_item_view=title+image")
    assert is_current(settings, labelled_run)
    run_dir = shutil.copytree(labelled_run, tmp_path / "run")
    ids, _, _ = items_of(run_dir, 1)
    changed = write_csv(tmp_path / "changed.csv", [("", "red dress", "", ids[0], "train")])
    ingest_queries(changed, settings, run_dir)
    assert not is_current(settings, run_dir)  # `moon demo` rebuilds the pairs
    build_pairs(settings, run_dir)
    ingest_queries(changed, settings, run_dir)  # the same file again: the same set
    assert is_current(settings, run_dir)

    # A model trained on other pairs is not current, though the config is the same.
    model = RunDir(run_dir).model("stage1")
    model.mkdir(parents=True)
    manifest = {"config_digest": settings.digest(*posttrain.SECTIONS), "pairs_digest": "other pairs"}
    (model / "manifest.json").write_text(json.dumps(manifest))
    assert not posttrain.is_current(settings, run_dir, 1)
    manifest["pairs_digest"] = pairs_digest(settings, run_dir)
    (model / "manifest.json").write_text(json.dumps(manifest))
    assert posttrain.is_current(settings, run_dir, 1)


def test_a_run_without_a_labelled_set_is_as_before(log_world, tmp_path):
    run_dir = shutil.copytree(log_world, tmp_path / "run")
    build_pairs(config(), run_dir)
    assert pairs_digest(config(), run_dir) == config().digest("world", "behaviour", "ingest", "pairs")
    stage1 = read_table(run_dir, "pairs_stage1")
    assert "labelled" not in stage1["action"].to_pylist()
    assert read_manifest(run_dir, "pairs_stage1")["labelled_queries"] is None
    sets = QuerySets.load(config(), run_dir)
    assert len(sets.labelled_photos) == len(sets.labelled_texts) == 0
    model = RunDir(run_dir).model("stage1")  # a model published before models recorded their pairs
    model.mkdir(parents=True)
    (model / "manifest.json").write_text(json.dumps({"config_digest": config().digest(*posttrain.SECTIONS)}))
    assert posttrain.is_current(config(), run_dir, 1)


def test_eval_retrieval_reports_the_labelled_sets_beside_the_simulated_ones(labelled_run, tmp_path, capsys):
    run_dir = shutil.copytree(labelled_run, tmp_path / "run")
    results = evaluate(config(), run_dir)
    saved = json.loads(RunDir(run_dir).retrieval_results.read_text())["models"]
    assert set(saved) == {"baseline", "untrained", "stage2"}
    for report in saved.values():
        assert {"dims", "text_search", "labelled_image_search", "labelled_text_search"} <= set(report)
        assert report["labelled_image_search"]["queries"] == report["labelled_text_search"]["queries"] == 6
        figure = report["labelled_image_search"]["dims"][max(report["labelled_image_search"]["dims"], key=int)]
        low, high = figure["recall@10"]["ci95"]
        assert low <= figure["recall@10"]["value"] <= high
    assert set(saved["stage2"]["labelled_image_search"]["dims"]) == {"16", "32"}  # every Matryoshka dim

    print_results(results)
    assert "labelled photo" in capsys.readouterr().out
    section = recall_section.section(run_dir)
    assert "labelled image search" in section.body and "labelled text search" in section.body
    assert section.metrics["recall"]["labelled_image_search"]["baseline"]["queries"] == 6


def test_labelled_recall_counts_a_hit_only_on_the_judged_items(labelled_run):
    sets = QuerySets.load(config(), labelled_run)
    ids, _, _ = items_of(labelled_run, LABELLED_ITEMS)
    rows = sets.views.rows(ids)
    assert sets.labelled_photos.targets == [[ids[n]] for n in range(1, LABELLED_ITEMS - 1, 2)] + \
        [sorted([ids[-1], ids[0]])]
    items = np.eye(len(sets.views), dtype=np.float32)  # every catalogue item its own direction

    def recall_at_1(photo_rows, text_rows):
        """recall@1 of the labelled photos and texts when each query's vector is that of the item at its row."""
        simulated = {"photos": np.tile(items[0], (len(sets.photos), 1)), "texts": np.tile(items[0], (len(sets.texts), 1))}
        vectors = Vectors(**simulated, items=items, dims=None,
                          labelled_photos=items[photo_rows], labelled_texts=items[text_rows])
        report, _, _ = sets.score(vectors, config())
        return tuple(report[key]["dims"][str(len(items))]["recall@1"]["value"]
                     for key in ("labelled_image_search", "labelled_text_search"))

    own = rows[1::2]  # the test queries' own items, in file order
    assert recall_at_1(own, own) == (1.0, 1.0)
    # Every query finding item 0 first: a miss, but for the last photo, which also judged item 0 a hit.
    first = [rows[0]] * (LABELLED_ITEMS // 2)
    assert recall_at_1(first, first) == (pytest.approx(1 / 6), 0.0)


# ---------------------------------------------------------------- the example


def test_the_example_makes_a_set_that_ingests_and_says_its_photos_are_synthetic(tmp_path, capsys):
    import runpy
    from pathlib import Path

    from conftest import shared_data
    from moon.sources.catalogue import ingest

    kaggle = shared_data("fashion-2k-kaggle")
    sample = tmp_path / "sample"  # the first 30 items, so the catalogue ingests in a moment
    sample.mkdir()
    lines = (kaggle / "styles.csv").read_text().splitlines()
    (sample / "styles.csv").write_text("\n".join(lines[:31]) + "\n")
    (sample / "images").symlink_to(kaggle / "images")
    run_dir = tmp_path / "run"
    ingest(sample, config(), run_dir)

    example = runpy.run_path(str(Path(__file__).parents[1] / "examples" / "labelled_photos.py"))
    assert "SYNTHETIC" in example["__doc__"] and "not photos taken by shoppers" in " ".join(example["__doc__"].split())
    example["main"]([str(sample), str(tmp_path / "set"), "--queries", "6", "--seed", "1"])
    assert "synthetic shopper photos" in capsys.readouterr().out
    summary = ingest_queries(tmp_path / "set" / "labelled.csv", config(), run_dir)
    assert summary.kept == 6 and summary.rejected == 0
    photos = read_table(run_dir, "labelled_queries")["query_image"].to_pylist()
    assert all(Image.open(io.BytesIO(photo)).format == "JPEG" for photo in photos)
