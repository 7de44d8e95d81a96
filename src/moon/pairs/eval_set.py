"""The image-search evaluation set: every shopper photo searched on the valid and test days, with its item.

Photo queries are drawn as the log draws them, so the set is every test-day session that
searched with a photo, not only those that ended in a purchase. A photo's item is the one
photographed where the log knows it (a simulated log's `query_truth`), else the item the
session engaged with most strongly (purchase, then cart, then click; the first of equals); a
photo whose session engaged with nothing and whose item is unknown has no answer and is
left out (counted). `action` is the session's strongest action on that item ("none" if it
did not engage with it): the photos whose item was bought (`action == "purchase"`) are the
purchase subset that `moon eval retrieval` reports beside the whole set. `split` says which days
a photo is from: the test days' photos measure, the valid days' photos are where choices of
recipe are made (`moon eval retrieval --split valid`), so that the test days stay unseen.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from moon.config import PairsConfig
from moon.errors import UserError
from moon.io import schema
from moon.io.tables import dataset, has_table, read_table
from moon.pairs.log import ACTION_RANK, MS_PER_DAY, assign_splits, first_photo_rows, split_starts
from moon.queries import query_id

EVALUATED_SPLITS = ("valid", "test")
PHOTO_COLUMNS = ["session_id", "ts", "region", "user_id", "query_image"]


def image_search_eval_set(log, catalogue, settings: PairsConfig, run_dir: Path, accounting) -> Iterator[pa.Table]:
    """The valid and test days' photo queries with their items, in time order: the input of image-based
    search recall."""
    engaged = _engaged(log)
    photos = _photos_from(run_dir, log.period_start_ms + split_starts(log.days, settings)[1] * MS_PER_DAY)
    truth = _photographed(run_dir)
    queries = [query_id(None, photo) for photo in photos["query_image"].to_pylist()]
    sessions = photos["session_id"].to_pylist()
    targets = [truth.get(q) or _strongest(engaged.get(s, {})) for q, s in zip(queries, sessions)]
    actions = [engaged.get(s, {}).get(t, "none") for s, t in zip(sessions, targets)]
    known = np.array([t is not None for t in targets], dtype=bool)
    accounting.record(
        "evaluation", "valid and test days: photo query with its item", photos.num_rows, int(known.sum()),
        **{"no item known (nothing engaged, no truth)": int((~known).sum())},
    )
    accounting.totals["evaluation subsets"] = {
        "item bought": sum(a == "purchase" for a in actions),
        "item known from the simulator's truth": sum(q in truth for q in queries),
    }
    rows = np.flatnonzero(known)
    if not len(rows):
        return
    items = pa.array([targets[i] for i in rows], pa.string())
    photos = assign_splits(photos.take(rows), log.period_start_ms, log.days, settings)
    yield pa.table(
        {
            "query_id": photos["session_id"],
            "query_image": photos["query_image"],
            "item_id": items,
            "spu_id": pa.array(catalogue.spu[catalogue.codes(items)].tolist(), pa.string()),
            "action": pa.array([actions[i] for i in rows], pa.string()),
            "ts": photos["ts"],
            "region": photos["region"],
            "user_id": photos["user_id"],
            "split": photos["split"],
        },
        schema=schema.EVAL_IMAGE_SEARCH,
    )


def _engaged(log) -> dict[str, dict[str, str]]:
    """Per valid- or test-day photo session: the items it engaged with, in time order, and its strongest
    action on each."""
    sessions: dict[str, dict[str, str]] = {}
    evaluated = {"split": pa.array(EVALUATED_SPLITS), "image_query": True}
    for part in log.scan(["session_id", "item_id", "action"], evaluated):
        for session, item, action in zip(*(part[c].to_pylist() for c in ("session_id", "item_id", "action"))):
            sessions.setdefault(session, {})[item] = action
    return sessions


def _strongest(actions: dict[str, str]) -> str | None:
    """The first item of the session's strongest action; None if it engaged with nothing."""
    return max(actions, key=lambda item: ACTION_RANK[actions[item]], default=None)


def _photos_from(run_dir: Path, from_ms: int) -> pa.Table:
    """The first event of each session that searched with a photo from `from_ms` on, in time order."""
    events = dataset(run_dir, "events")
    wanted = (ds.field("ts") >= pa.scalar(from_ms, schema.TIMESTAMP)) & ds.field("query_image").is_valid()
    rows = events.to_table(columns=PHOTO_COLUMNS, filter=wanted)
    first = first_photo_rows(rows, "query_image")
    rows = rows.take(first["row"])
    return rows.take(pc.sort_indices(rows, [("ts", "ascending"), ("session_id", "ascending")]))


def _photographed(run_dir: Path) -> dict[str, str]:
    """query id -> the item a simulated shopper photographed; empty for a real log."""
    if not has_table(run_dir, "query_truth"):
        return {}
    truth = read_table(run_dir, "query_truth", ["query_id", "item_id"])
    return dict(zip(truth["query_id"].to_pylist(), truth["item_id"].to_pylist()))


def eval_photos(run_dir: Path, split: str = "test", columns: list[str] | None = None) -> pa.Table:
    """The evaluation set's photos of one split (valid or test)."""
    if split not in EVALUATED_SPLITS:
        raise UserError(f"the evaluation set has splits {', '.join(EVALUATED_SPLITS)}, not {split!r}")
    table = read_table(run_dir, "eval_image_search", columns and list(dict.fromkeys([*columns, "split"])))
    table = table.filter(pc.equal(table["split"], split))
    return table.select(columns) if columns else table
