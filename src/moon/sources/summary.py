"""The data summary a person reads after `moon simulate` / `moon demo`: what the run's tables hold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from moon import ui
from moon.io.schema import ACTIONS
from moon.io.tables import has_table, read_manifest, read_table


def summarize(run_dir: Path) -> list[tuple[str, object]]:
    items = read_table(run_dir, "items", ["spu_id", "category", "created_at"])
    rows: list[tuple[str, object]] = [
        ("items", items.num_rows),
        ("SPUs", pc.count_distinct(items["spu_id"]).as_py()),
        ("leaf categories", pc.count_distinct(leaf_categories(items["category"])).as_py()),
    ]
    if not has_table(run_dir, "events"):
        return rows
    manifest = read_manifest(run_dir, "events")
    events = read_table(run_dir, "events", ["action", "session_id", "query_text", "user_id"])
    actions = dict(zip(*np.unique(events["action"].to_numpy(zero_copy_only=False), return_counts=True)))
    counts = {action: int(actions.get(action, 0)) for action in ACTIONS}
    start = np.datetime64(manifest["period_start"], "ms")
    created = items["created_at"].to_numpy(zero_copy_only=False).astype("datetime64[ms]")
    sessions = events.group_by("session_id").aggregate([("query_text", "count")])
    image_queries = int(pc.sum(pc.equal(sessions["query_text_count"], 0)).as_py() or 0)
    rows += [
        ("users", pc.count_distinct(events["user_id"]).as_py()),
        ("days", manifest["days"]),
        *((f"events: {action}", counts[action]) for action in ACTIONS),
        ("CTR (clicks / impressions)", counts["click"] / max(counts["impression"], 1)),
        ("purchases / clicks", counts["purchase"] / max(counts["click"], 1)),
        ("share of new items (launched in period)", float((created >= start).mean())),
        ("text queries", sessions.num_rows - image_queries),
        ("image queries (user photos)", image_queries),
    ]
    return rows


def print_summary(run_dir: Path) -> None:
    ui.print_table(f"data in {run_dir}", summarize(run_dir))


def leaf_categories(category: pa.ChunkedArray) -> pa.Array:
    """The last element of each category path (root -> leaf)."""
    lengths = pc.list_value_length(category).to_numpy(zero_copy_only=False)
    return pc.list_flatten(category).take(pa.array(np.cumsum(lengths) - 1))
