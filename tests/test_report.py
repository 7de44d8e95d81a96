"""`moon report`: the HTML page and metrics.json of a tiny trained run, and of a run that has only
its simulated data. Images are checked by really decoding them; the gallery against the evaluation
table and the recall figures of the same run."""

import base64
import io
import json
import shutil
from html.parser import HTMLParser

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import TINY_MODEL, TINY_WORLD
from moon.cli import cli
from moon.config import load_config
from moon.eval import world
from moon.errors import UserError
from moon.eval.retrieval import evaluate, print_results
from moon.io.tables import MANIFEST, read_table, table_path
from moon.pairs.build import build_pairs
from moon.pairs.eval_set import eval_photos
from moon.report import build_report, gallery
from moon.report import recall as recall_section
from moon.report.html import THUMB_SIDE
from moon.represent import embed_catalogue
from moon.run import RunDir
from moon.train import posttrain

SECTIONS = ["data-summary", "pair-accounting", "world", "training-curves", "recall", "image-search-gallery", "ctr",
            "study"]
MODELS = {"baseline", "untrained", "stage1", "stage2"}  # no pretraining: it is the slowest stage to set up
SHORT_TRAINING = [
    "posttrain.from_pretrained=false", "posttrain.stage1.steps=2", "posttrain.stage1.batch_size=8", "posttrain.stage1.log_every=1",
    "posttrain.stage2.steps=2", "posttrain.stage2.batch_size=4", "posttrain.stage2.log_every=1",
    "store.partitions=2",
]


def config():
    return load_config(None, [*TINY_WORLD, *TINY_MODEL, *SHORT_TRAINING, "name=tiny"])


def copy_world(tiny_world, run_dir):
    for table in ("items", "item_truth", "users", "events", "query_truth", "impression_truth"):
        shutil.copytree(tiny_world / table, run_dir / table)
    return run_dir


@pytest.fixture(scope="module")
def trained_run(tiny_world, tmp_path_factory):
    """The tiny world with pairs, its measure, two steps of each post-training stage and the retrieval evaluation."""
    run_dir = copy_world(tiny_world, tmp_path_factory.mktemp("report"))
    build_pairs(config(), run_dir)
    world.evaluate(config(), run_dir)
    posttrain.posttrain(config(), run_dir, stage=1)
    posttrain.posttrain(config(), run_dir, stage=2)
    evaluate(config(), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def report(trained_run):
    path = build_report(config(), trained_run)
    return Page.read(path), json.loads((path.parent / "metrics.json").read_text())


class Page(HTMLParser):
    """What a reader of the report sees: section ids, images, and the gallery's rows."""

    def __init__(self):
        super().__init__()
        self.sections, self.images, self.queries = [], [], []
        self.text = []
        self._figure = None

    @classmethod
    def read(cls, path):
        page = cls()
        page.feed(path.read_text())
        return page

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "h2":
            self.sections.append(attrs.get("id"))
        elif tag == "img":
            self.images.append(attrs)
            if self._figure is not None:
                self._figure["images"] += 1
        elif tag == "div" and attrs.get("class") == "query":
            self.queries.append({"id": attrs["data-query-id"], "bought": attrs["data-bought"], "figures": []})
        elif tag == "figure" and self.queries:
            self._figure = {"class": attrs.get("class", "").split(), "item": attrs.get("data-item-id"),
                            "caption": "", "images": 0}
            self.queries[-1]["figures"].append(self._figure)

    def handle_endtag(self, tag):
        if tag == "figure":
            self._figure = None

    def handle_data(self, data):
        self.text.append(data)
        if self._figure is not None:
            self._figure["caption"] += data

    def all_text(self) -> str:
        return " ".join(self.text)


def decode(attrs) -> Image.Image:
    """The image of a data URI, fully decoded."""
    header, payload = attrs["src"].split(",", 1)
    assert header in ("data:image/png;base64", "data:image/jpeg;base64"), header
    image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
    image.load()
    assert image.format == header.split("/")[1].split(";")[0].upper()
    return image


def test_the_report_has_every_section_and_the_headline_numbers(report, trained_run):
    page, metrics = report
    assert page.sections == SECTIONS
    assert page.all_text().count("not run yet") == 2  # the pretraining log and the CTR stage only
    assert "real shop photos" in page.all_text() and "Click ceilings" in page.all_text()  # how hard the world is
    assert metrics["world"]["photos"]["R@10"]["value"] > 0
    assert "moon pretrain" in page.all_text() and "moon ctr build" in page.all_text()
    assert set(metrics["models"]) == MODELS
    saved = json.loads((trained_run / "eval" / "retrieval.json").read_text())["models"]
    for model in MODELS:
        dims = saved[model]["dims"]
        full = max(dims, key=int)
        headline = metrics["recall"]["image_search"][model]
        assert headline["dim"] == int(full)
        for k in (1, 10, 50, 100):
            assert headline[f"recall@{k}"]["value"] == dims[full][f"recall@{k}"]["value"]
        assert metrics["recall"]["hard_same_leaf"][model]["recall@10"] == saved[model]["hard_same_leaf"]["recall@10"]
        for group, figures in saved[model].items():  # any further metric group the evaluation writes
            if isinstance(figures, dict) and "dims" in figures:
                assert metrics["recall"][group][model]["queries"] == figures["queries"]
    assert metrics["data"]["items"] == 240 and metrics["data"]["catalogue"] == "simulated"
    assert {step["stage"] for step in metrics["pairs"]["steps"]} >= {"interactions", "stage 1", "stage 2", "evaluation"}
    assert set(metrics["training"]) == {"stage1", "stage2"}
    for stage in ("stage1", "stage2"):
        assert metrics["training"][stage]["steps"] == 2 and metrics["training"][stage]["train_seconds"] > 0
    assert sorted(p.name for p in (trained_run / "report").iterdir()) == ["metrics.json", "report.html"]


def test_every_embedded_image_decodes_at_its_stated_size(report):
    page, _ = report
    plots = [attrs for attrs in page.images if attrs["data-kind"] == "plot"]
    thumbs = [attrs for attrs in page.images if attrs["data-kind"] == "thumb"]
    assert len(plots) >= 2 + 2  # a training figure per stage; recall@K curves and recall@10 per dimension
    assert len(thumbs) == 8 * (1 + 5 + 1)  # per query: the photo, five results, the bought item
    for attrs in page.images:
        image = decode(attrs)
        assert image.size == (int(attrs["width"]), int(attrs["height"]))
    for attrs in thumbs:
        assert max(decode(attrs).size) == THUMB_SIDE


def test_the_gallery_shows_eight_queries_with_five_results_and_marks_the_hits(report, trained_run):
    page, metrics = report
    rows = eval_photos(trained_run, "test", ["query_id", "item_id"]).to_pylist()
    bought = {(row["query_id"], row["item_id"]) for row in rows}
    assert len(page.queries) == 8
    hits = 0
    for query in page.queries:
        assert (query["id"], query["bought"]) in bought
        results = [f for f in query["figures"] if "result" in f["class"]]
        assert len(results) == 5 and all(f["images"] == 1 for f in query["figures"])
        for figure in results:
            is_hit = figure["item"] == query["bought"]
            assert ("hit" in figure["class"]) == is_hit and ("hit" in figure["caption"]) == is_hit
        hits += any(f["item"] == query["bought"] for f in results)
    gallery = metrics["gallery"]
    assert gallery["model"] == "stage2" and gallery["hits"] == hits and gallery["queries"] == 8
    # every held-out query was searched, exactly as `moon eval retrieval` searched it
    stage2 = metrics["recall"]["image_search"]["stage2"]
    assert gallery["searched"] == len(bought)
    assert stage2["recall@1"]["value"] <= gallery["recall@5_of_searched"] <= stage2["recall@10"]["value"]
    found_hits = round(gallery["recall@5_of_searched"] * len(bought))
    assert hits == min(found_hits, max(4, 8 - (len(bought) - found_hits)))  # hits and misses both shown


def test_the_gallery_renders_what_eval_found_without_loading_a_model(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    version = embed_catalogue(config(), run_dir, model="stage2")
    evaluate(config(), run_dir)
    predictions = pq.read_table(RunDir(run_dir).predictions("stage2"))
    assert predictions.schema.metadata[b"item_vectors"] == f"store version {version.name}".encode()
    # the saved rankings are the ones recall was computed from
    bought = eval_photos(run_dir, "test", ["item_id"])["item_id"].to_pylist()
    hits = [item in found for item, found in zip(bought, predictions["item_ids"].to_pylist())]
    recall = json.loads(RunDir(run_dir).retrieval_results.read_text())["models"]["stage2"]["dims"]["32"]
    assert np.mean(hits) == pytest.approx(recall["recall@10"]["value"])

    shutil.rmtree(run_dir / "models")  # the gallery needs no model: it renders eval's predictions
    (run_dir / "models" / "stage2").mkdir(parents=True)
    (run_dir / "models" / "stage2" / MANIFEST).write_text("{}")
    section = gallery.section(config(), run_dir)
    assert section.metrics["gallery"]["item_vectors"] == f"store version {version.name}"
    assert section.body.count('class="query"') == 8


def test_a_run_with_only_simulated_data_says_what_is_not_run_yet(tiny_world, tmp_path):
    run_dir = copy_world(tiny_world, tmp_path / "run")
    result = CliRunner().invoke(cli, ["report", "--run-dir", str(run_dir), "--quiet"])
    assert result.exit_code == 0, result.output
    page = Page.read(run_dir / "report" / "report.html")
    text = page.all_text()
    assert page.sections == SECTIONS
    for command in ("moon pairs", "moon pretrain", "moon posttrain --stage 1", "moon posttrain --stage 2",
                    "moon eval world", "moon eval retrieval", "moon ctr build"):
        assert command in text
    assert text.count("not run yet") >= 7  # pairs, the world's measure, three training logs, recall, gallery
    assert page.images == [] and page.queries == []
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    assert metrics["data"]["items"] == 240 and "models" not in metrics and "gallery" not in metrics


def test_a_real_catalogue_with_simulated_behaviour_is_stated(tiny_world, tmp_path):
    run_dir = copy_world(tiny_world, tmp_path / "run")
    manifest = table_path(run_dir, "items") / MANIFEST
    made = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**made, "simulated": False, "catalog": "/data/real-shop",
                                    "simulated_columns": ["created_at"]}))
    build_report(config(), run_dir)
    text = Page.read(run_dir / "report" / "report.html").all_text()
    assert "behaviour is simulated over a real catalogue: /data/real-shop" in text
    assert json.loads((run_dir / "report" / "metrics.json").read_text())["data"]["catalogue"] == "real"


def test_recall_reads_any_metric_group_and_tolerates_absent_ones(tmp_path):
    def figure(value):
        return {"value": value, "ci95": [value - 0.1, value + 0.1]}

    results = {"models": {
        "stage2": {
            "dims": {"16": {"recall@1": figure(0.2), "recall@10": figure(0.5)},
                     "32": {"recall@1": figure(0.3), "recall@10": figure(0.6)}},
            "queries": 40,
            "text_query": {"dims": {"32": {"recall@10": figure(0.7)}}, "queries": 25},
            "item_to_item": {"recall@10": figure(0.4)},
        },
        "baseline": {"dims": {"218": {"recall@1": figure(0.1), "recall@10": figure(0.2)}}},
    }}
    path = tmp_path / "eval" / "retrieval.json"
    path.parent.mkdir()
    path.write_text(json.dumps(results))
    section = recall_section.section(tmp_path)
    groups = section.metrics["recall"]
    assert list(groups) == ["image_search", "text_query", "item_to_item"]
    assert groups["image_search"]["stage2"]["dim"] == 32 and groups["image_search"]["stage2"]["queries"] == 40
    assert groups["image_search"]["stage2"]["recall@10_by_dim"] == {"16": 0.5, "32": 0.6}
    text_query = groups["text_query"]["stage2"]
    assert text_query["recall@10"]["value"] == 0.7 and text_query["queries"] == 25
    assert "baseline" not in groups["text_query"]
    assert section.body.count('data-kind="plot"') == 2  # recall@K curves, recall@10 per dim: image search only


def test_recipes_are_chosen_on_the_valid_days_without_touching_the_test_days_results(trained_run, tmp_path, capsys):
    run_dir = shutil.copytree(trained_run, tmp_path / "run")
    test_results = RunDir(run_dir).retrieval_results.read_text()
    predictions = RunDir(run_dir).predictions("stage2").read_bytes()
    valid = evaluate(config(), run_dir, split="valid")
    saved = json.loads(RunDir(run_dir).retrieval_results_of("valid").read_text())
    assert saved["split"] == "valid" and set(saved["models"]) == set(valid) >= {"baseline", "stage1", "stage2"}
    assert valid["baseline"]["queries"] == eval_photos(run_dir, "valid").num_rows > 0
    assert not set(eval_photos(run_dir, "valid")["query_id"].to_pylist()) & set(
        eval_photos(run_dir, "test")["query_id"].to_pylist())
    assert RunDir(run_dir).retrieval_results.read_text() == test_results  # the test days' results stand
    assert RunDir(run_dir).predictions("stage2").read_bytes() == predictions
    # what stage 2 adds to stage 1, paired on the same queries
    added = valid["stage2"]["vs_stage1"]["image_search"]["recall@10"]
    assert added["queries"] == valid["baseline"]["queries"] and added["ci95"][0] <= added["delta"] <= added["ci95"][1]
    print_results(valid)
    assert "of stage 2 minus stage 1's" in capsys.readouterr().out
    with pytest.raises(UserError, match="not 'train'"):
        eval_photos(run_dir, "train")
