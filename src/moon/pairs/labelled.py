"""Post-training pairs from the train split of a labelled query set (`moon ingest-queries`).

Each (query, relevant item) of the train split is a pair of the task its query asks for: a
photo gives `image-><view>`, a text `text-><view>`, where the view is
`pairs.labelled_item_view`; a query with both gives one pair of each. They come on top of
the behaviour log's mix, since judgements made by people are few and each is worth keeping,
with weight `pairs.labelled_weight` and action `labelled`. They join both stages: a person's
judgement is as strong a positive as a purchase, and stage 2 trained without the pairs of
stage 1's best task would unlearn it. The test split never becomes a pair: it is a query set
of `moon eval retrieval`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from moon.config import PairsConfig
from moon.io import schema
from moon.io.tables import has_table, read_manifest, read_table
from moon.pairs.accounting import Accounting
from moon.pairs.log import Catalogue
from moon.pairs.stage1 import as_pairs

TABLE = "labelled_queries"
LABELLED = "labelled"  # the action, user and region of a labelled pair: no shopper's session made it
QUERY_COLUMNS = {"text": "query_text", "image": "query_image"}  # a pair's query view -> the column it needs
# What becomes of a (query, item) of the set; every one but KEPT is a reason in the accounting.
KEPT = "kept"
TEST = "test split (evaluated by moon eval retrieval)"
GONE = "item no longer in the catalogue"
OFF = "pairs.labelled_weight is 0"


def labelled_digest(run_dir: Path) -> str | None:
    """What the run's labelled set says (its content digest), None without one: the pairs follow it."""
    return read_manifest(run_dir, TABLE).get("content_digest") if has_table(run_dir, TABLE) else None


def labelled_pairs(run_dir: Path, catalogue: Catalogue, settings: PairsConfig, accounting: Accounting,
                   stage: str = "stage 1") -> Iterator[pa.Table]:
    """The labelled set's train pairs, one table per task; nothing when the run has no labelled set.
    `stage` names the pair table they join, in the accounting."""
    if not has_table(run_dir, TABLE):
        return
    judged = query_item_rows(run_dir)
    fates = _fates(judged, catalogue, settings)
    ingested = dt.datetime.fromisoformat(read_manifest(run_dir, TABLE)["created_at"])
    accounting.totals["labelled queries"] = _totals(judged)
    for query_view, column in QUERY_COLUMNS.items():
        task = f"{query_view}->{settings.labelled_item_view}"
        asked = pc.is_valid(judged[column]).to_numpy(zero_copy_only=False)
        reasons = {str(fate): int(n) for fate, n in zip(*np.unique(fates[asked], return_counts=True))}
        kept = reasons.pop(KEPT, 0)
        accounting.record(stage, f"labelled {task}", int(asked.sum()), kept, **reasons)
        if kept:
            yield _as_labelled_pairs(judged.filter(pa.array(asked & (fates == KEPT))), task, ingested, settings)


def query_item_rows(run_dir: Path) -> pa.Table:
    """One row per (labelled query, relevant item), with the query's text, photo and split."""
    queries = read_table(run_dir, TABLE, columns=["query_id", "query_text", "query_image", "item_ids", "split"])
    parents = pc.list_parent_indices(queries["item_ids"])
    rows = queries.drop_columns(["item_ids"]).take(parents)
    return rows.append_column("item_id", pc.list_flatten(queries["item_ids"]))


def _fates(judged: pa.Table, catalogue: Catalogue, settings: PairsConfig) -> np.ndarray:
    test = pc.equal(judged["split"], "test").to_numpy(zero_copy_only=False)
    known = pc.is_in(judged["item_id"], value_set=catalogue.ids).to_numpy(zero_copy_only=False)
    off = settings.labelled_weight == 0
    return np.where(test, TEST, np.where(~known, GONE, OFF if off else KEPT))


def _totals(judged: pa.Table) -> dict[str, int]:
    """Queries and (query, item) rows of each split, for the report's accounting."""
    totals = {}
    for split in ("train", "test"):
        rows = judged.filter(pc.equal(judged["split"], split))
        totals[f"{split} queries"] = pc.count_distinct(rows["query_id"]).as_py()
        totals[f"{split} (query, item) rows"] = rows.num_rows
    return totals


def _as_labelled_pairs(rows: pa.Table, task: str, ingested: dt.datetime, settings: PairsConfig) -> pa.Table:
    """Rows of the pairs table: each query is a session of its own, dated when the set was ingested."""
    n = rows.num_rows
    constant = pa.array([LABELLED] * n)
    table = pa.table({
        "query_text": rows["query_text"], "photo": rows["query_image"], "item_id": rows["item_id"],
        "action": constant, "ts": pa.array([ingested] * n, schema.TIMESTAMP),
        "region": constant, "user_id": constant, "session_id": rows["query_id"], "split": rows["split"],
    })
    pairs = as_pairs(table, task, settings)
    weights = pa.array(np.full(n, settings.labelled_weight, np.float32))
    return pairs.set_column(pairs.schema.get_field_index("weight"), schema.PAIRS.field("weight"), weights)
