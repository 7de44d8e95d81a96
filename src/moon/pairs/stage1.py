"""Stage 1: MOON's nine query->item tasks from clicks, carts and purchases, mixed by `pairs.mix`."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from moon.config import PairsConfig
from moon.io import schema
from moon.pairs.accounting import Accounting
from moon.pairs.log import BehaviourLog, take_rows

ITEM_QUERY_VIEWS = ("title+image", "richer-text+image")  # views an item-as-query pair may take
TEXT_COLUMNS = ["session_id", "item_id", "action", "ts", "user_id", "region", "query_text", "split"]
# Each kind of query -> where its candidate pairs are: (table of the log, row filter, columns to read).
CANDIDATES = {
    "text": ("interactions", {"image_query": False}, TEXT_COLUMNS),
    "image": ("interactions", {"image_query": True}, [*TEXT_COLUMNS, "photo"]),
    "item": ("item_pairs", None, None),
}


def mix_quotas(available: dict[str, int], mix: dict[str, float]) -> dict[str, int]:
    """Pairs per task in proportion to the mix, as many as the scarcest task allows.

    Tasks the log cannot feed at all (e.g. image tasks of a text-only log) are left out
    of the scale, so they do not empty the others.
    """
    shares = {task: share for task, share in mix.items() if share > 0 and available.get(task, 0) > 0}
    if not shares:
        return {task: 0 for task in schema.TASKS}
    scale = min(available[task] / share for task, share in shares.items())
    return {task: min(available.get(task, 0), int(round(mix.get(task, 0) * scale))) for task in schema.TASKS}


def stage1_pairs(log: BehaviourLog, settings: PairsConfig, rng, accounting: Accounting) -> Iterator[pa.Table]:
    """The pairs of each task in turn, streamed from the time-ordered interactions.

    Each task's sample is drawn when its turn comes, so only one task's row numbers are in
    memory at a time; draws and accounting keep the tasks' order.
    """
    available_by_query = {query: log.count(where, table) for query, (table, where, _) in CANDIDATES.items()}
    available = {task: available_by_query[_query(task)] for task in schema.TASKS}
    quotas = mix_quotas(available, settings.mix)
    for task in schema.TASKS:
        keep = np.sort(rng.choice(available[task], quotas[task], replace=False))
        accounting.record(
            "stage 1", task, available[task], len(keep),
            **{"beyond the task's mix share": available[task] - len(keep)},
        )
        table, where, columns = CANDIDATES[_query(task)]
        for part in take_rows(log.scan(columns, where, table), keep):
            yield as_pairs(part, task, settings)


def _query(task: str) -> str:
    """What a task's query is: text, image (a user photo) or item (the earlier item of a session)."""
    query_view = task.split("->")[0]
    return query_view if query_view in ("text", "image") else "item"


def as_pairs(table: pa.Table, task: str, settings: PairsConfig) -> pa.Table:
    """Rows of the pairs table; optional columns of `table`: photo, pos_spu_id, hard_neg_item_ids."""
    query_view, item_view = task.split("->")
    n = table.num_rows
    weights = np.array([settings.action_weights.get(a, 1.0) for a in table["action"].to_pylist()], np.float32)
    columns = {
        "task": pa.array([task] * n),
        "query_view": pa.array([query_view] * n),
        "query_text": table["query_text"] if query_view == "text" else pa.nulls(n, pa.string()),
        "query_image": table["photo"] if query_view == "image" else pa.nulls(n, pa.binary()),
        "query_item_id": table["query_item_id"] if query_view in ITEM_QUERY_VIEWS else pa.nulls(n, pa.string()),
        "pos_item_id": table["item_id"],
        "pos_spu_id": table["pos_spu_id"] if "pos_spu_id" in table.column_names else table["item_id"],
        "item_view": pa.array([item_view] * n),
        "hard_neg_item_ids": (
            table["hard_neg_item_ids"] if "hard_neg_item_ids" in table.column_names
            else pa.array([[]] * n, pa.list_(pa.string()))
        ),
        "action": table["action"],
        "weight": weights,
        "ts": table["ts"],
        "region": table["region"],
        "user_id": table["user_id"],
        "session_id": table["session_id"],
        "split": table["split"],
    }
    return pa.table(columns, schema=schema.PAIRS)
