"""Real behaviour logs: UBI, MOON's events and Taobao UserBehavior in; UBI out; every bad row a reject."""

import base64
import csv
import io
import json
import shutil

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import TINY_WORLD, write_items
from moon import pipeline
from moon.config import load_config
from moon.errors import UserError
from moon.io.tables import read_manifest, read_table
from moon.pairs.build import build_pairs
from moon.pairs.log import log_digest
from moon.run import RunDir
from moon.sources.catalogue import ingest
from moon.sources.log import ingest_log
from moon.sources.ubi import export_log


def config(*overrides):
    return load_config(None, [*TINY_WORLD, "name=tiny", *overrides])


def fresh_run(tiny_world, tmp_path, name="real"):
    """A run over the tiny world's catalogue, ingested as a user would (`moon ingest items/`)."""
    run_dir = tmp_path / name
    ingest(RunDir(tiny_world).table("items"), config(), run_dir, "parquet")
    return run_dir


def sorted_events(run_dir):
    table = read_table(run_dir, "events")
    return table.sort_by([(column, "ascending") for column in ("ts", "session_id", "item_id", "action")])


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_lines(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def photo(size=(24, 24), colour=(200, 30, 40), noise=False) -> bytes:
    image = Image.effect_noise(size, 64).convert("RGB") if noise else Image.new("RGB", size, colour)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def test_an_exported_log_ingested_over_the_same_catalogue_gives_the_same_events_and_pairs(tiny_world, tmp_path):
    original = tmp_path / "original"
    shutil.copytree(tiny_world, original)
    counts = export_log(original, tmp_path / "ubi")
    assert counts["events"] == read_manifest(original, "events")["rows"]

    run_dir = fresh_run(tiny_world, tmp_path)
    summary = ingest_log(tmp_path / "ubi", config(), run_dir)
    assert summary.rejected_by_reason == dict.fromkeys(summary.rejected_by_reason, 0)
    assert sorted_events(run_dir).equals(sorted_events(original))
    manifest = read_manifest(run_dir, "events")
    assert manifest["simulated"] is False and manifest["behaviour"] == "real"
    assert (manifest["period_start"], manifest["days"]) == (read_manifest(original, "events")["period_start"],
                                                            read_manifest(original, "events")["days"])

    expected, got = build_pairs(config(), original), build_pairs(config(), run_dir)
    steps = lambda accounting: [vars(s) for s in accounting.steps if s.stage != "evaluation"]  # noqa: E731
    assert steps(got) == steps(expected)
    assert got.totals["pairs_stage1"] == expected.totals["pairs_stage1"]
    # A real log does not say what a photo showed: only the photos whose session engaged keep an item.
    evaluation = lambda accounting: next(s for s in accounting.steps if s.stage == "evaluation")  # noqa: E731
    assert evaluation(got).rows_in == evaluation(expected).rows_in == evaluation(expected).kept
    assert 0 < evaluation(got).kept < evaluation(expected).kept


def test_a_log_comes_in_parts_and_an_event_ingested_twice_is_a_duplicate(tiny_world, tmp_path):
    export_log(tiny_world, tmp_path / "ubi")
    queries, events = lines(tmp_path / "ubi" / "queries.jsonl"), lines(tmp_path / "ubi" / "events.jsonl")
    half = {query["query_id"] for query in queries[: len(queries) // 2]}
    for part, keep in (("one", lambda q: q in half), ("two", lambda q: q not in half)):
        (tmp_path / part).mkdir()
        write_lines(tmp_path / part / "queries.jsonl", [q for q in queries if keep(q["query_id"])])
        write_lines(tmp_path / part / "events.jsonl", [e for e in events if keep(e["query_id"])])

    run_dir = fresh_run(tiny_world, tmp_path)
    first = ingest_log(tmp_path / "one", config(), run_dir)
    digest = log_digest(config(), run_dir, "pairs")
    second = ingest_log(tmp_path / "two", config(), run_dir)
    assert log_digest(config(), run_dir, "pairs") != digest  # the pairs and CTR samples are made again
    assert first.kept + second.kept == len(events) == second.total_events
    assert sorted_events(run_dir).equals(sorted_events(tiny_world))

    before = read_manifest(run_dir, "events")
    again = ingest_log(tmp_path / "one", config(), run_dir)
    assert again.kept == 0 and again.rejected_by_reason["duplicate_event"] == first.kept
    assert read_manifest(run_dir, "events") == before  # the log is untouched, and what was made from it current
    rejects = pq.read_table(RunDir(run_dir).log_rejects)
    assert pc.sum(pc.equal(rejects["reason"], "duplicate_event")).as_py() == first.kept


def test_every_bad_ubi_row_is_a_reject_with_its_reason_and_the_good_rows_are_kept(tiny_world, tmp_path):
    run_dir = fresh_run(tiny_world, tmp_path)
    items = read_table(run_dir, "items", ["item_id"])["item_id"].to_pylist()
    a, b, c = items[:3]
    source = tmp_path / "ubi"
    source.mkdir()
    (source / "shopper.jpg").write_bytes(photo())
    queries = [
        {"query_id": "q1", "user_query": "red dress", "client_id": "u1", "timestamp": "2026-03-01T10:00:00Z",
         "query_response_hit_ids": [a, b]},  # impressions from the hit list
        {"query_id": "q2", "user_query": "", "user_id": "u2", "timestamp": "2026-03-01T11:00:00+02:00",
         "query_response_object_ids": [c], "query_attributes": {"query_image_ref": "shopper.jpg"}},  # plugin variant
        {"query_id": "q3", "user_query": "", "user_id": "u3", "timestamp": "2026-03-02T09:00:00Z",
         "query_attributes": {"query_image": base64.b64encode(b"not an image").decode()}},
        {"query_id": "q4", "user_query": "", "user_id": "u4", "timestamp": "2026-03-02T09:00:00Z",
         "query_attributes": {"query_image": base64.b64encode(photo((400, 400), noise=True)).decode()}},
    ]
    write_lines(source / "queries.jsonl", queries)

    def event(action, item, query="q1", ts="2026-03-01T10:00:05Z", event_id=None, **attributes):
        return {"action_name": action, "timestamp": ts, "query_id": query, "client_id": "u1", "event_id": event_id,
                "event_attributes": {"object": {"object_id": item}, **attributes}}

    events = [
        event("click", a, event_id="e1", position={"ordinal": {"index": 1}}),  # kept
        event("add_to_cart", a, event_id="e2", ts=1772359300000),  # kept: epoch milliseconds
        event("click", c, event_id="e3"),  # q1 did not show c
        event("click", "no-such-item", event_id="e4"),
        event("click", b, event_id="e5", ts="yesterday"),
        event("wishlist", b, event_id="e6"),
        event("click", b, event_id="e1"),  # a duplicate id
        event("click", c, query="q2", position={"ordinal": 1}),  # kept: the plugin's integer ordinal
        event("click", c, query="q3"),
        event("click", c, query="q4"),
        {"action_name": "click", "timestamp": "2026-03-01T10:00:05Z", "event_attributes": {"object": {"object_id": a}}},
    ]
    write_lines(source / "events.jsonl", events)
    with (source / "events.jsonl").open("a") as file:
        file.write("{not json\n")

    summary = ingest_log(source, config("ingest.max_query_image_bytes=20000"), run_dir)
    assert summary.kept_by_action == {"impression": 3, "click": 2, "cart": 1, "purchase": 0}
    assert {reason: n for reason, n in summary.rejected_by_reason.items() if n} == {
        "click_without_impression": 1, "unknown_item": 1, "bad_timestamp": 1, "unknown_action": 1,
        "duplicate_event": 1, "corrupt_image": 1, "image_too_large": 1, "missing_user": 1, "malformed_line": 1}
    assert summary.image_queries == 1 and summary.text_queries == 1
    rejects = pq.read_table(RunDir(run_dir).log_rejects).to_pylist()
    assert all(reject["source"].endswith(".jsonl") and reject["row"] >= 1 and reject["detail"] for reject in rejects)

    events = read_table(run_dir, "events").to_pylist()
    clicked = {(row["session_id"], row["item_id"]): row for row in events if row["action"] == "click"}
    assert clicked["q1", a]["position"] == 1 and clicked["q2", c]["position"] == 1
    assert clicked["q2", c]["query_image"] == (source / "shopper.jpg").read_bytes()
    assert clicked["q2", c]["query_text"] is None and clicked["q1", a]["query_text"] == "red dress"
    shown = sorted((row["item_id"], row["position"]) for row in events if row["session_id"] == "q1"
                   and row["action"] == "impression")
    assert shown == [(a, 1), (b, 2)]


def test_moon_events_as_csv_with_photos_as_paths_or_base64(tiny_world, tmp_path):
    run_dir = fresh_run(tiny_world, tmp_path)
    a = read_table(run_dir, "items", ["item_id"])["item_id"][0].as_py()
    (tmp_path / "p.jpg").write_bytes(photo())
    rows = [
        {"ts": "2026-03-01T10:00:00Z", "user_id": "u1", "session_id": "s1", "region": "north", "query_text": "",
         "query_image": "p.jpg", "item_id": a, "position": 1, "action": "impression"},
        {"ts": "2026-03-01T10:00:09Z", "user_id": "u1", "session_id": "s1", "region": "north", "query_text": "",
         "query_image": "p.jpg", "item_id": a, "position": 1, "action": "click"},
        {"ts": "2026-03-02T10:00:00Z", "user_id": "u2", "session_id": "s2", "region": "south", "query_text": "",
         "query_image": base64.b64encode(photo(colour=(0, 0, 200))).decode(), "item_id": a, "position": 3,
         "action": "impression"},
    ]
    with (tmp_path / "log.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = ingest_log(tmp_path / "log.csv", config(), run_dir)
    assert summary.format == "events" and summary.kept == 3 and summary.image_queries == 2
    events = read_table(run_dir, "events").to_pylist()
    assert events[0]["query_image"] == (tmp_path / "p.jpg").read_bytes()
    assert read_manifest(run_dir, "events")["days"] == 2


def test_taobao_user_behaviour_has_no_queries_and_the_summary_says_what_that_leaves(tiny_world, tmp_path):
    run_dir = fresh_run(tiny_world, tmp_path)
    a, b = read_table(run_dir, "items", ["item_id"])["item_id"].to_pylist()[:2]
    day = 1772323200  # 2026-03-01 00:00 UTC
    (tmp_path / "UserBehavior.csv").write_text("\n".join([
        f"7,{a},1001,pv,{day + 10}", f"7,{b},1001,pv,{day + 20}", f"7,{b},1001,fav,{day + 30}",
        f"7,{b},1001,buy,{day + 40}", f"8,{a},1001,pv,{day + 86_400}", f"8,{a},1001,rate,{day + 86_401}",
        f"8,{a},1001,pv", "",
    ]))
    summary = ingest_log(tmp_path / "UserBehavior.csv", config(), run_dir)
    assert summary.format == "taobao"
    assert summary.kept_by_action == {"impression": 0, "click": 3, "cart": 1, "purchase": 1}
    assert summary.rejected_by_reason["unknown_action"] == 1 and summary.rejected_by_reason["malformed_line"] == 1
    assert summary.sessions == 2 and summary.text_queries == summary.image_queries == 0
    assert summary.tasks["text search pairs (text -> item)"].startswith("no")
    assert summary.tasks["CTR (impressions)"].startswith("no")
    assert summary.tasks["item -> item pairs"].startswith("yes (1 ")
    events = read_table(run_dir, "events").to_pylist()
    assert {row["position"] for row in events} == {0} and {row["session_id"] for row in events} == {"7-20260301",
                                                                                                      "8-20260302"}


def test_a_run_with_a_real_log_simulates_nothing_and_a_simulated_log_is_never_mixed_with_real_events(
        tiny_world, tmp_path):
    export_log(tiny_world, tmp_path / "ubi")
    run_dir = fresh_run(tiny_world, tmp_path)
    ingest_log(tmp_path / "ubi", config(), run_dir)
    before = read_manifest(run_dir, "events")
    pipeline.run([pipeline.SIMULATE], config(), run_dir, fresh=True)
    assert read_manifest(run_dir, "events") == before
    assert not RunDir(run_dir).has_table("users")

    with pytest.raises(UserError, match="simulated behaviour log"):
        ingest_log(tmp_path / "ubi", config(), tiny_world)
    with pytest.raises(UserError, match="no catalogue"):
        ingest_log(tmp_path / "ubi", config(), tmp_path / "empty")
    other = tmp_path / "other"  # a catalogue that shares no item with the log
    items = read_table(tiny_world, "items")
    write_items(other, items.set_column(0, "item_id", pc.binary_join_element_wise("x-", items["item_id"], "")))
    with pytest.raises(UserError, match="no event of .* could be used"):
        ingest_log(tmp_path / "ubi", config(), other)
    assert pq.read_table(RunDir(other).log_rejects).num_rows > 0
    with pytest.raises(UserError, match="not a UBI export"):
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "notes.txt").write_text("mine")
        export_log(tiny_world, tmp_path / "mine")



def test_a_log_without_queries_feeds_item_to_item_pairs_only(tiny_world, tmp_path):
    events = read_table(tiny_world, "events")
    browsing = events.filter(pc.not_equal(events["action"], "impression"))
    browsing = browsing.set_column(4, "query_text", pa.nulls(browsing.num_rows, pa.string()))
    browsing = browsing.set_column(5, "query_image", pa.nulls(browsing.num_rows, pa.binary()))
    pq.write_table(browsing, tmp_path / "browsing.parquet")
    run_dir = fresh_run(tiny_world, tmp_path)
    summary = ingest_log(tmp_path / "browsing.parquet", config(), run_dir)
    assert summary.kept == browsing.num_rows and summary.tasks["text search pairs (text -> item)"].startswith("no")

    accounting = build_pairs(config(), run_dir)
    stage1 = read_table(run_dir, "pairs_stage1", ["task"])["task"].to_pylist()
    assert stage1 and {task.split("->")[0] for task in stage1} <= {"title+image", "richer-text+image"}
    assert read_table(run_dir, "pairs_stage2").num_rows == 0
    assert accounting.totals["pairs_stage1"]
