"""`moon ctr build`: the behaviour log -> CTR samples and the per-user behaviour side tables.

One sample per impression, labelled 1 when the shopper clicked it. A sample holds no
behaviour: each user's clicks, carts and purchases (`ctr_behaviour`) and searches
(`ctr_queries`) are stored once, in time order, and a sample's sequences are looked up when
the samples are loaded (`moon.ctr.data`), as what the user did strictly before the sample's
`ts`. A row therefore never sees its own click, nor anything later, whatever the sequence
length.

Samples are split by day exactly as the pairs stage splits its pairs (`pairs.test_days`,
`pairs.valid_days`): the CTR test days are the days no representation model trained on, and
the manifest lists them. The stage reads only the `events` table, so it works on a simulated
log and on a real one alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from moon import ui
from moon.config import MoonConfig
from moon.io import schema
from moon.io.tables import TableWriter, dataset, made_with, read_manifest
from moon.pairs.log import MS_PER_DAY, check_split_days, log_digest, split_of_days, split_starts
from moon.queries import query_ids

SECTIONS = ("pairs",)  # with the log's (`log_digest`): the samples are split by the pairs' days
OUTPUTS = ("ctr_samples", "ctr_behaviour", "ctr_queries")
BEHAVIOUR_ACTIONS = ("click", "cart", "purchase")
LOG_COLUMNS = ["ts", "user_id", "session_id", "query_text", "query_image", "item_id", "position", "action"]
BATCH_ROWS = 200_000


def is_current(config: MoonConfig, run_dir: Path) -> bool:
    """Whether the samples were made from this config and this log (the pipeline's test)."""
    return made_with(run_dir, OUTPUTS, log_digest(config, run_dir, *SECTIONS))


def build_samples(config: MoonConfig, run_dir: Path) -> dict:
    """Writes `ctr_samples`, `ctr_behaviour` and `ctr_queries`; returns the samples' manifest."""
    run_dir = Path(run_dir)
    start_ms, days = log_period(run_dir)
    check_split_days(days, config.pairs)
    impressions, behaviour = read_log(run_dir)
    samples = label_impressions(impressions, behaviour)
    samples = add_days_and_splits(samples, start_ms, days, config)
    common = {"stage": "ctr build", "config_digest": log_digest(config, run_dir, *SECTIONS), "seed": config.seed}
    splits = split_days(start_ms, days, config)
    write(run_dir, "ctr_samples", samples.sort_by([("ts", "ascending"), ("request_id", "ascending"),
                                                   ("position", "ascending")]),
          {**common, "days": splits, "clicks": int(pc.sum(samples["label"]).as_py() or 0),
           "test_days_note": "the test days are the days no representation model trained on "
                             "(post-training uses the pairs of the train days only)"})
    write(run_dir, "ctr_behaviour", behaviour.sort_by([("user_id", "ascending"), ("ts", "ascending")]), common)
    searches = impressions.group_by(["user_id", "request_id", "query_id"]).aggregate([("ts", "min")])
    searches = searches.rename_columns(["user_id", "request_id", "query_id", "ts"]).select(["user_id", "ts", "query_id"])
    write(run_dir, "ctr_queries", searches.sort_by([("user_id", "ascending"), ("ts", "ascending")]), common)
    manifest = read_manifest(run_dir, "ctr_samples")
    ui.log(f"CTR samples: {manifest['rows']:,} impressions, {manifest['clicks']:,} clicks; "
           f"{len(behaviour):,} behaviour events, {len(searches):,} searches")
    return manifest


def log_period(run_dir: Path) -> tuple[int, int]:
    """(first day's start in ms since the epoch, number of days) of the log, from its manifest."""
    manifest = read_manifest(run_dir, "events")
    return int(np.datetime64(manifest["period_start"], "ms").astype(np.int64)), int(manifest["days"])


def read_log(run_dir: Path) -> tuple[pa.Table, pa.Table]:
    """(impressions with their query id, behaviour events), streamed: query photos are hashed
    batch by batch and never held whole."""
    impressions, behaviour = [], []
    for batch in dataset(run_dir, "events").to_batches(columns=LOG_COLUMNS, batch_size=BATCH_ROWS):
        shown = batch.filter(pc.equal(batch["action"], "impression"))
        ids = query_ids(shown["query_text"], shown["query_image"])
        impressions.append(pa.table({
            "ts": shown["ts"], "user_id": shown["user_id"], "request_id": shown["session_id"], "query_id": ids,
            "item_id": shown["item_id"], "position": shown["position"],
        }))
        acted = batch.filter(pc.is_in(batch["action"], pa.array(BEHAVIOUR_ACTIONS)))
        behaviour.append(pa.table({"user_id": acted["user_id"], "ts": acted["ts"], "item_id": acted["item_id"],
                                   "action": acted["action"], "request_id": acted["session_id"]}))
    return pa.concat_tables(impressions), pa.concat_tables(behaviour)


def label_impressions(impressions: pa.Table, behaviour: pa.Table) -> pa.Table:
    """Each impression with label 1 when its request clicked its item."""
    clicked = behaviour.filter(pc.equal(behaviour["action"], "click")).group_by(["request_id", "item_id"]).aggregate([])
    clicked = clicked.append_column("label", pa.array(np.ones(len(clicked), np.int8)))
    joined = impressions.join(clicked, keys=["request_id", "item_id"], join_type="left outer", use_threads=False)
    return joined.set_column(joined.schema.get_field_index("label"), "label", pc.fill_null(joined["label"], 0))


def add_days_and_splits(samples: pa.Table, start_ms: int, days: int, config: MoonConfig) -> pa.Table:
    day = (samples["ts"].cast(pa.int64()).to_numpy() - start_ms) // MS_PER_DAY
    split = split_of_days(day, days, config.pairs)
    return samples.append_column("day", pa.array(day.astype(np.int16))).append_column("split", pa.array(split))


def split_days(start_ms: int, days: int, config: MoonConfig) -> dict[str, list[str]]:
    """The calendar days of each split, for the manifest."""
    test_from, valid_from = split_starts(days, config.pairs)
    dates = [str(np.datetime64(start_ms + d * MS_PER_DAY, "ms").astype("datetime64[D]")) for d in range(days)]
    return {"train": dates[:valid_from], "valid": dates[valid_from:test_from], "test": dates[test_from:]}



def write(run_dir: Path, name: str, table: pa.Table, manifest: dict) -> None:
    with TableWriter(run_dir, name, schema.TABLES[name]) as writer:
        for part in table.to_batches(max_chunksize=BATCH_ROWS):
            writer.write(part)
        writer.commit(**manifest)
