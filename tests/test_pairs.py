"""Post-training pairs: each cleaning rule on a hand-made log whose survivors are known."""

import datetime as dt
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image

from moon.config import load_config
from moon.io import schema
from moon.io.tables import TableWriter, read_table
from moon.pairs.build import build_pairs
from moon.pairs.eval_set import eval_photos
from moon.pairs.stage1 import mix_quotas
from moon.run import RunDir

START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
COLOURS = {"red": (200, 30, 40), "blue": (40, 100, 210), "green": (40, 150, 70), "black": (20, 20, 20),
           "yellow": (240, 210, 40), "pink": (236, 120, 170)}


def picture(colour: str, shape: int = 0) -> bytes:
    image = Image.new("RGB", (48, 48), (250, 250, 250))
    pixels = np.asarray(image).copy()
    pixels[8 + shape * 3:40, 10:38 - shape * 4] = COLOURS[colour]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def item(item_id, spu, title, leaf, colour, shape=0):
    return {
        "item_id": item_id, "spu_id": spu, "title": title,
        "category": ["Women", "Dresses" if leaf == "Dresses" else "Tops", leaf],
        "attributes": [("colour", colour), ("brand", title.split()[0])],
        "image": picture(colour, shape), "shop_id": "shop1", "price": 10.0, "created_at": START - dt.timedelta(days=30),
    }


CATALOGUE = [
    item("d1", "P1", "Velora red silk dress", "Dresses", "red"),
    item("d2", "P1", "Velora blue silk dress", "Dresses", "blue"),  # sibling SKU of d1
    item("d3", "P2", "Kintaro green cotton dress", "Dresses", "green", 1),
    item("d4", "P3", "Kintaro black linen dress", "Dresses", "black", 2),
    item("d5", "P4", "Suvi yellow party dress", "Dresses", "yellow", 3),
    item("t1", "P5", "Velora pink cotton blouse", "Blouses", "pink"),
    item("t2", "P6", "Kintaro red linen blouse", "Blouses", "red", 1),
    item("t3", "P7", "blouse", "Blouses", "green", 2),  # a title with a single entity
]


class Log:
    """Builds a behaviour log session by session."""

    def __init__(self):
        self.rows = []
        self.sessions = 0

    def session(self, day, query, acts, user="u1", photo=None):
        """acts: [(item_id, action)], action one of click/cart/purchase, or impression only."""
        self.sessions += 1
        sid, ts = f"s{self.sessions}", START + dt.timedelta(days=day, hours=1 + self.sessions % 20)
        ladder = ["impression", "click", "cart", "purchase"]
        for position, (item_id, action) in enumerate(acts, start=1):
            for step in ladder[: ladder.index(action) + 1]:
                self.rows.append({
                    "ts": ts + dt.timedelta(seconds=10 * position + ladder.index(step)),
                    "user_id": user, "session_id": sid, "region": "north",
                    "query_text": None if photo else query, "query_image": photo,
                    "item_id": item_id, "position": position, "action": step,
                })
        return sid

    def write(self, run_dir, days=6):
        with TableWriter(run_dir, "items", schema.ITEMS) as writer:
            writer.write(pa.Table.from_pylist(CATALOGUE, schema=schema.ITEMS))
            writer.commit(stage="test")
        with TableWriter(run_dir, "events", schema.EVENTS) as writer:
            writer.write(pa.Table.from_pylist(self.rows, schema=schema.EVENTS))
            writer.commit(stage="test", period_start="2026-01-01", days=days)
        return run_dir


ONLY = ["pairs.dedup_similarity=false", "pairs.spu_merge=false", "pairs.category_alignment=false", "pairs.ner_filter=false"]


def run_pairs(run_dir, *overrides):
    config = load_config(None, ["pairs.valid_days=1", "pairs.test_days=1", *overrides])
    accounting = build_pairs(config, run_dir)
    return accounting, read_table(run_dir, "pairs_stage1"), read_table(run_dir, "pairs_stage2")


def step(accounting, stage, name):
    return next(s for s in accounting.steps if s.stage == stage and s.name == name)


def test_one_interaction_per_session_item_with_its_strongest_action(tmp_path):
    log = Log()
    log.session(0, "red dress", [("d1", "purchase"), ("d3", "click"), ("d4", "impression")])
    log.session(1, "blouse", [("t1", "cart")])
    only_text = [f"pairs.mix.{task}={1.0 if task == 'text->richer-text' else 0.0}" for task in schema.TASKS]
    accounting, stage1, _ = run_pairs(log.write(tmp_path), *ONLY, *only_text)
    first = accounting.steps[0]
    assert (first.rows_in, first.kept) == (3 + 1 + 2, 3)  # click+cart+purchase, click, click+cart
    text = stage1.filter(pc.equal(stage1["task"], "text->richer-text"))
    assert dict(zip(text["pos_item_id"].to_pylist(), text["action"].to_pylist())) == {"d1": "purchase", "d3": "click", "t1": "cart"}
    weights = dict(zip(text["pos_item_id"].to_pylist(), text["weight"].to_pylist()))
    assert weights == {"d1": 3.0, "d3": 1.0, "t1": 2.0}


def test_stage1_builds_the_nine_tasks_and_item_as_query_pairs(tmp_path):
    log = Log()
    photo = picture("red")
    log.session(0, "red dress", [("d1", "click"), ("d3", "purchase")])
    log.session(1, None, [("d1", "purchase")], photo=photo)
    mix = [f"pairs.mix.{task}=1.0" for task in schema.TASKS]
    _, stage1, _ = run_pairs(log.write(tmp_path), *ONLY, *mix)
    tasks = pc.value_counts(stage1["task"]).to_pylist()
    counts = {t["values"]: t["counts"] for t in tasks}
    # equal shares: the scarcest tasks (one image interaction, one item->item pair) set the scale
    assert counts == {task: 1 for task in schema.TASKS}
    item_pair = stage1.filter(pc.equal(stage1["task"], "title+image->title+image")).to_pylist()[0]
    assert (item_pair["query_item_id"], item_pair["pos_item_id"]) == ("d1", "d3")  # earlier item is the query
    image_pair = stage1.filter(pc.equal(stage1["query_view"], "image")).to_pylist()[0]
    assert image_pair["query_image"] == photo and image_pair["query_text"] is None


def test_mix_quotas_follow_the_shares_up_to_the_scarcest_task():
    mix = {task: 0.0 for task in schema.TASKS} | {"text->image": 0.2, "text->richer-text+image": 0.5, "image->image": 0.2}
    available = {task: 1000 for task in schema.TASKS} | {"image->image": 40}
    quotas = mix_quotas(available, mix)
    assert quotas["image->image"] == 40 and quotas["text->image"] == 40 and quotas["text->richer-text+image"] == 100
    assert quotas["text->richer-text"] == 0


def test_splits_are_by_day_and_evaluation_never_leaks_into_training(tmp_path):
    log = Log()
    for day in range(6):
        log.session(day, "red dress", [("d1", "purchase")], user=f"u{day}")
        log.session(day, None, [("d3", "purchase")], user=f"v{day}", photo=picture("green", 1))
    run = log.write(tmp_path)
    _, stage1, stage2 = run_pairs(run, *ONLY)
    held_out = read_table(run, "eval_image_search")
    days = lambda t: ((t["ts"].cast(pa.int64()).to_numpy() - int(START.timestamp() * 1000)) // 86_400_000)
    for pairs in (stage1, stage2):
        split = np.array(pairs["split"].to_pylist())
        assert set(days(pairs)[split == "test"]) == {5} and set(days(pairs)[split == "valid"]) == {4}
        assert days(pairs)[split == "train"].max() <= 3
    # the valid day's photo is where recipes are chosen, the test day's where they are measured
    assert dict(zip(held_out["split"].to_pylist(), days(held_out).tolist())) == {"valid": 4, "test": 5}
    evaluation = eval_photos(run, "test")
    assert evaluation.num_rows == 1 and days(evaluation).tolist() == [5]
    eval_sessions = set(evaluation["query_id"].to_pylist())
    for pairs in (stage1, stage2):
        training = pairs.filter(pc.is_in(pairs["split"], pa.array(["train", "valid"])))
        assert not eval_sessions & set(training["session_id"].to_pylist())
        assert training["ts"].cast(pa.int64()).to_numpy().max() < evaluation["ts"].cast(pa.int64()).to_numpy().min()


def test_similarity_dedup_keeps_the_hardest_query_per_item(tmp_path):
    log = Log()
    log.session(0, "velora red silk dress", [("d1", "purchase")], user="a")
    log.session(1, "something for a wedding", [("d1", "purchase")], user="b")
    log.session(1, "kintaro green cotton dress", [("d3", "purchase")], user="c")
    off = [o for o in ONLY if "dedup" not in o]
    accounting, _, stage2 = run_pairs(log.write(tmp_path), *off)
    kept = dict(zip(stage2["pos_item_id"].to_pylist(), stage2["query_text"].to_pylist()))
    assert kept == {"d1": "something for a wedding", "d3": "kintaro green cotton dress"}
    assert step(accounting, "stage 2", "similarity dedup").dropped == {"easier query, same item": 1}


def test_spu_merge_counts_sibling_skus_as_one_positive_and_never_as_negatives(tmp_path):
    log = Log()
    log.session(0, "velora silk dress", [("d1", "purchase")], user="a")
    log.session(1, "Velora  silk dress", [("d2", "purchase")], user="b")  # same query, sibling SKU
    log.session(2, "kintaro dress", [("d3", "purchase")], user="c")
    off = [o for o in ONLY if "spu_merge" not in o]
    accounting, _, stage2 = run_pairs(log.write(tmp_path), *off, "pairs.hard_negatives=10", "pairs.mined_negatives=10")
    assert sorted(stage2["pos_item_id"].to_pylist()) == ["d1", "d3"]
    assert dict(zip(stage2["pos_item_id"].to_pylist(), stage2["pos_spu_id"].to_pylist())) == {"d1": "P1", "d3": "P2"}
    assert step(accounting, "stage 2", "SPU merge").kept == 2
    for row in stage2.to_pylist():
        spu_of = {i["item_id"]: i["spu_id"] for i in CATALOGUE}
        assert row["hard_neg_item_ids"], "hard negatives found"
        assert all(spu_of[n] != row["pos_spu_id"] for n in row["hard_neg_item_ids"])


def test_hard_negatives_are_same_leaf_other_spu_and_never_what_the_session_touched(tmp_path):
    log = Log()
    log.session(0, "velora red dress", [("d3", "click"), ("d1", "purchase")])
    accounting, _, stage2 = run_pairs(log.write(tmp_path), *ONLY, "pairs.hard_negatives=2", "pairs.mined_negatives=0")
    negatives = stage2["hard_neg_item_ids"].to_pylist()[0]
    assert len(negatives) == 2 and set(negatives) <= {"d4", "d5"}  # d2: same SPU; d3: clicked in the session


def test_category_alignment_down_samples_leaves_over_represented_against_impressions(tmp_path):
    log = Log()
    for k in range(6):  # dress purchases dominate, but blouses get as many impressions
        log.session(k % 4, f"dress {k}", [(f"d{1 + k % 5}", "purchase"), ("t1", "impression"), ("t2", "impression")], user=f"a{k}")
    log.session(0, "blouse", [("t2", "purchase"), ("d4", "impression")], user="b")
    off = [o for o in ONLY if "category" not in o]
    accounting, _, stage2 = run_pairs(log.write(tmp_path), *off)
    leaves = [("t" if i.startswith("t") else "d") for i in stage2["pos_item_id"].to_pylist()]
    # impressions: dresses 6 + 1, blouses 12 -> dress share 7/19 of 7 pairs -> ceil(2.58) = 3
    assert leaves.count("t") == 1 and leaves.count("d") == 3
    assert step(accounting, "stage 2", "category alignment").dropped == {"leaf over-exposed vs impressions": 3}


def test_ner_filter_drops_queries_and_titles_with_too_few_entities(tmp_path):
    log = Log()
    log.session(0, "red silk dress", [("d1", "purchase")], user="a")
    log.session(0, "dress", [("d3", "purchase")], user="b")  # one entity in the query
    log.session(0, "green blouse", [("t3", "purchase")], user="c")  # title "blouse": one entity
    off = [o for o in ONLY if "ner" not in o]
    accounting, _, stage2 = run_pairs(log.write(tmp_path), *off)
    assert stage2["pos_item_id"].to_pylist() == ["d1"]
    assert step(accounting, "stage 2", "NER filter").dropped == {
        "query < 2 entities": 1, "title < 2 entities": 1,
    }


def test_accounting_balances_and_chains_on_a_simulated_world(tiny_world, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_world, run)
    config = load_config(None, ["pairs.valid_days=1", "pairs.test_days=2"])
    accounting = build_pairs(config, run)
    stats = json.loads(RunDir(run).pairs_stats.read_text())
    for entry in stats["steps"]:
        assert entry["rows_in"] == entry["kept"] + sum(entry["dropped"].values())
    stage2 = [s for s in accounting.steps if s.stage == "stage 2"]
    assert all(a.kept == b.rows_in for a, b in zip(stage2, stage2[1:]))
    assert stage2[-1].kept == read_table(run, "pairs_stage2").num_rows
    stage1 = [s for s in accounting.steps if s.stage == "stage 1"]
    assert sum(s.kept for s in stage1) == read_table(run, "pairs_stage1").num_rows
    assert read_table(run, "eval_image_search").num_rows > 0


def test_unknown_mix_task_is_refused():
    from moon.errors import UserError

    with pytest.raises(UserError, match=r"'pairs.mix'.*unknown tasks \['text->video'\]"):
        load_config(None, ["pairs.mix.text->video=0.5"])


def test_tiny_batches_and_many_spill_parts_build_the_same_tables(tiny_world, tmp_path, monkeypatch):
    """The log streams through session parts, time buckets and read batches sized from
    pairs.batch_rows: cut into many small pieces, it must give exactly the same tables."""
    import shutil

    from moon.pairs import log as pair_log
    from moon.pairs import stage2
    from moon.pairs.build import OUTPUTS

    parts = []

    class CountedSpill(pair_log.Spill):
        def __init__(self, folder, table_schema, count):
            super().__init__(folder, table_schema, count)
            parts.append(count)

    monkeypatch.setattr(pair_log, "Spill", CountedSpill)
    built = {}
    for name, overrides in {"default": [], "tiny": ["pairs.batch_rows=37"]}.items():
        if name == "tiny":
            monkeypatch.setattr(stage2, "DESCRIBE_BLOCK", 5)
        run = tmp_path / name
        shutil.copytree(tiny_world, run)
        parts.clear()
        accounting = build_pairs(load_config(None, ["pairs.valid_days=1", "pairs.test_days=2", *overrides]), run)
        built[name] = ({table: read_table(run, table) for table in OUTPUTS}, accounting.steps, max(parts))
        assert not [p.name for p in run.iterdir() if p.name.startswith(".pairs-work")], "work folder removed"
    (default, default_steps, default_parts), (tiny, tiny_steps, tiny_parts) = built["default"], built["tiny"]
    assert default_parts == 1 and tiny_parts > 20  # one part each vs. many session parts and time buckets
    assert tiny_steps == default_steps
    for table in OUTPUTS:
        assert tiny[table].num_rows > 0 and tiny[table].equals(default[table]), table


def test_an_item_missing_from_the_catalogue_is_a_user_error_and_leaves_no_work_files(tmp_path):
    from moon.errors import UserError

    log = Log()
    log.session(0, "red dress", [("d1", "click"), ("x9", "purchase")])
    run = log.write(tmp_path)
    with pytest.raises(UserError, match="names item x9 that the items table lacks"):
        run_pairs(run)
    assert not [p.name for p in run.iterdir() if p.name.startswith(".pairs-work")]
    assert not RunDir(run).has_table("pairs_stage1")


def test_the_evaluation_set_is_every_valid_and_test_day_photo_with_its_item(tmp_path):
    log = Log()
    bought = log.session(5, None, [("d2", "impression"), ("d1", "purchase")], user="a", photo=picture("red"))
    clicked = log.session(5, None, [("d3", "click"), ("d4", "cart")], user="b", photo=picture("green", 1))
    log.session(5, None, [("d5", "impression")], user="c", photo=picture("yellow", 3))  # engaged with nothing
    photographed = log.session(5, None, [("t1", "impression")], user="d", photo=picture("pink"))
    chosen_on = log.session(4, None, [("d3", "purchase")], user="e", photo=picture("blue"))  # a valid day
    run = log.write(tmp_path)
    # A simulated log knows what each photo showed; a real one has only what the session did.
    from moon.queries import query_id
    with TableWriter(run, "query_truth", schema.QUERY_TRUTH) as writer:
        writer.write(pa.Table.from_pylist([{"query_id": query_id(None, picture("pink")), "item_id": "t1",
                                            "names_colour": False, "names_brand": False, "names_attribute": False}],
                                          schema=schema.QUERY_TRUTH))
        writer.commit(stage="test")
    accounting, _, _ = run_pairs(run, *ONLY)
    evaluation = eval_photos(run, "test")
    found = dict(zip(evaluation["query_id"].to_pylist(),
                     zip(evaluation["item_id"].to_pylist(), evaluation["action"].to_pylist())))
    assert found == {bought: ("d1", "purchase"), clicked: ("d4", "cart"), photographed: ("t1", "none")}
    valid = eval_photos(run, "valid")
    assert valid["query_id"].to_pylist() == [chosen_on] and valid["item_id"].to_pylist() == ["d3"]
    kept = step(accounting, "evaluation", "valid and test days: photo query with its item")
    assert (kept.rows_in, kept.kept) == (5, 4)
    assert kept.dropped == {"no item known (nothing engaged, no truth)": 1}
