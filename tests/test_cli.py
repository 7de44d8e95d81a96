"""The `moon` command as a user runs it: real processes, real files."""

import io
import json
import subprocess
import sys

import pyarrow.compute as pc
from PIL import Image

from conftest import TINY_MODEL, TINY_WORLD, shared_data
from moon.io.tables import read_manifest, read_table
from moon.pairs.eval_set import eval_photos
from test_ingest import good_rows, write_catalogue

SHORT_TRAINING = ["pretrain.steps=2", "pretrain.batch_size=8", "posttrain.stage1.steps=2",
                  "posttrain.stage1.batch_size=8", "posttrain.stage2.steps=2", "posttrain.stage2.batch_size=4"]


def moon(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "moon", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_help_lists_the_stages():
    result = moon("--help")
    assert result.returncode == 0
    for stage in ("simulate", "ingest", "pairs", "demo", "config"):
        assert stage in result.stdout


def test_demo_on_a_tiny_world(tmp_path):
    result = moon("demo", "--quiet", *TINY_WORLD, *TINY_MODEL, *SHORT_TRAINING, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for line in ("items", "SPUs", "leaf categories", "users", "events: click", "CTR", "share of new items", "image queries"):
        assert line in result.stdout
    for step in ("text->richer-text", "similarity dedup", "NER filter", "hard negatives", "photo query"):
        assert step in result.stdout  # the pair accounting
    assert result.stderr == ""  # --quiet: no progress, no logs
    run_dir = tmp_path / "runs" / "demo"
    assert read_table(run_dir, "items").num_rows == 240
    assert read_table(run_dir, "pairs_stage2").num_rows > 0
    for model in ("baseline", "untrained", "stage1", "stage2"):
        assert model in result.stdout  # the recall table
    models = json.loads((run_dir / "eval" / "retrieval.json").read_text())["models"]
    assert "pretrain" not in models and not (run_dir / "models" / "pretrain").exists()  # the demo skips it
    assert set(models) >= {"baseline", "stage2"}
    assert {"dims", "hard_same_leaf", "text_search", "item_to_item"} <= set(models["stage2"])
    assert "text search and item -> item recall" in result.stdout
    assert (run_dir / "index" / "v1-stage2" / "full" / "index.faiss").is_file()  # the embed and index stages
    assert "CTR on the test days" in result.stdout  # the CTR stage, with CUBE on stage-2 and baseline vectors
    ctr = json.loads((run_dir / "eval" / "ctr.json").read_text())["models"]
    assert {"dnn", "din"} <= set(ctr) and {name.split("/")[0] for name in ctr if name.startswith("cube@")} == {
        "cube@v1-stage2", "cube@v2-baseline"}
    assert "minus the baseline's on the same queries" in result.stdout  # paired differences
    world = json.loads((run_dir / "eval" / "world.json").read_text())
    assert world["photos"]["photos"] == eval_photos(run_dir, "test").num_rows > 0
    assert "Photo difficulty" in result.stdout and result.stdout.count("Click ceilings") == 2  # eval world, ctr eval
    again = moon("demo", *TINY_WORLD, *TINY_MODEL, *SHORT_TRAINING, cwd=tmp_path)  # current stages are skipped
    assert again.returncode == 0 and again.stderr.count("are current, skipped") == 9
    assert "pretrain: skipped, posttrain.from_pretrained is false" in again.stderr
    assert "trained before, reused" in again.stderr


def test_user_errors_exit_2_with_one_line_and_no_traceback(tmp_path):
    for args in (
        ("simulate", "world.itemz=3"),
        ("simulate", "world.items=lots"),
        ("simulate", "-c", str(tmp_path / "missing.yaml")),
        ("ingest", str(tmp_path / "no-such-catalogue")),
        ("simulate", "--catalog", str(tmp_path), "--run-dir", str(tmp_path / "run")),
    ):
        result = moon(*args)
        assert result.returncode == 2, args
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_config_show_prints_the_resolved_config():
    result = moon("config", "show", "world.items=123")
    assert result.returncode == 0
    assert "items: 123" in result.stdout and "# number of items (SKUs) in the catalogue" in result.stdout


def test_ingest_then_simulate_over_the_real_kaggle_sample(tmp_path):
    source = shared_data("fashion-2k-kaggle")
    run_dir = tmp_path / "kaggle"
    ingest = moon("ingest", str(source), "--run-dir", str(run_dir), "--quiet")
    assert ingest.returncode == 0, ingest.stderr
    assert "kept" in ingest.stdout
    overrides = ["behaviour.users=30", "behaviour.days=3", "behaviour.photo_size=48"]
    sim = moon("simulate", "--catalog", str(run_dir), "--run-dir", str(run_dir), "--quiet", *overrides)
    assert sim.returncode == 0, sim.stderr

    items = read_table(run_dir, "items")
    events = read_table(run_dir, "events")
    assert items.num_rows >= 1990
    assert set(pc.unique(events["item_id"]).to_pylist()) <= set(items["item_id"].to_pylist())
    manifest = read_manifest(run_dir, "items")
    assert manifest["simulated"] is False and manifest["simulated_columns"] == ["created_at"]
    assert manifest["ingest"]["source"] == str(source)
    for table in ("events", "users", "item_truth"):
        assert read_manifest(run_dir, table)["simulated"] is True
    # text queries use the real catalogue's words, image queries are photos of its real products
    words = " ".join(pc.unique(events["query_text"].drop_null()).to_pylist())
    assert "tshirts" in words or "watches" in words or "shirts" in words
    photo = events.filter(pc.is_valid(events["query_image"]))["query_image"][0].as_py()
    assert Image.open(io.BytesIO(photo)).size == (48, 48)
    # a second simulation over the same run directory re-simulates launch times
    again = moon("simulate", "--catalog", str(run_dir), "--run-dir", str(run_dir), "--quiet", *overrides, "behaviour.start_date=2026-06-01")
    assert again.returncode == 0, again.stderr
    assert read_manifest(run_dir, "items")["simulated_columns"] == ["created_at"]
    assert json.loads((run_dir / "events" / "manifest.json").read_text())["period_start"] == "2026-06-01"


def test_a_stage_never_replaces_an_ingested_catalogue(tmp_path):
    """Ingest, simulate behaviour over it, then a demo whose config forgot behaviour.catalog:
    the demo stops with exit 2 and one line, and the ingested catalogue is intact."""
    source = write_catalogue(tmp_path, good_rows())
    run_dir = tmp_path / "x"
    assert moon("ingest", str(source), "--run-dir", str(run_dir), "--quiet", "ingest.image_dir=images").returncode == 0
    ingested = read_table(run_dir, "items")
    for args in (("demo", "--run-dir", str(run_dir), *TINY_WORLD),
                 ("demo", "--fresh", "--run-dir", str(run_dir), *TINY_WORLD),
                 ("simulate", "--run-dir", str(run_dir), *TINY_WORLD),
                 ("simulate", "--catalog", str(tmp_path / "elsewhere"), "--run-dir", str(run_dir))):
        result = moon(*args, "--quiet")
        assert result.returncode == 2, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert f"{run_dir / 'items'} holds 2 rows a user brought in (made by `moon ingest` from {source})" in result.stderr
        assert "behaviour.catalog" in result.stderr and "--replace-ingested" in result.stderr
        assert read_table(run_dir, "items").equals(ingested)
        assert read_manifest(run_dir, "items")["stage"] == "ingest"
        assert not (run_dir / "events").exists()
    # said explicitly, a simulated world replaces it
    replaced = moon("simulate", "--replace-ingested", "--run-dir", str(run_dir), "--quiet", *TINY_WORLD)
    assert replaced.returncode == 0, replaced.stderr
    assert read_table(run_dir, "items").num_rows == 240 and read_manifest(run_dir, "items")["simulated"] is True
