"""Stage 1: MOON's nine query->item tasks from clicks, carts and purchases, mixed by `pairs.mix`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from moon.config import PairsConfig
from moon.io import schema
from moon.pairs.accounting import Accounting
from moon.pairs.log import BehaviourLog, session_photos, with_photos

ITEM_QUERY_VIEWS = ("title+image", "richer-text+image")  # views an item-as-query pair may take


def stage1_candidates(log: BehaviourLog) -> dict[str, pa.Table]:
    """Every candidate pair of every task, before the mix is applied."""
    acts = log.interactions
    text = acts.filter(pc.invert(acts["image_query"]))
    image = acts.filter(acts["image_query"])
    item_pairs = _items_of_one_session(acts)
    candidates = {}
    for task in schema.TASKS:
        query_view, item_view = task.split("->")
        source = {"text": text, "image": image}.get(query_view, item_pairs)
        candidates[task] = source
    return candidates


def _items_of_one_session(acts: pa.Table) -> pa.Table:
    """Ordered (earlier item -> later item) pairs of items one session interacted with."""
    left = acts.select(["session_id", "item_id", "ts"]).rename_columns(["session_id", "query_item_id", "query_ts"])
    joined = left.join(acts, keys="session_id", join_type="inner", use_threads=False)
    later = pc.or_(
        pc.less(joined["query_ts"], joined["ts"]),
        pc.and_(pc.equal(joined["query_ts"], joined["ts"]), pc.less(joined["query_item_id"], joined["item_id"])),
    )
    pairs = joined.filter(pc.and_(pc.not_equal(joined["query_item_id"], joined["item_id"]), later))
    return pairs.sort_by([("ts", "ascending"), ("session_id", "ascending"), ("query_item_id", "ascending"), ("item_id", "ascending")])


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


def stage1_pairs(log: BehaviourLog, settings: PairsConfig, rng, accounting: Accounting, run_dir: Path) -> Iterator[pa.Table]:
    """The pairs of each task in turn, so that only one task's photos are in memory at a time."""
    candidates = stage1_candidates(log)
    quotas = mix_quotas({task: table.num_rows for task, table in candidates.items()}, settings.mix)
    sampled = {}
    for task, table in candidates.items():
        keep = np.sort(rng.choice(table.num_rows, quotas[task], replace=False))
        accounting.record(
            "stage 1", task, table.num_rows, len(keep),
            **{"beyond the task's mix share": table.num_rows - len(keep)},
        )
        sampled[task] = table.take(keep)
    image_tasks = [task for task in sampled if task.startswith("image->")]
    sessions = pc.unique(pa.chunked_array([sampled[t]["session_id"] for t in image_tasks], pa.string()))
    photos = session_photos(run_dir, sessions, settings)
    for task in list(sampled):
        table = sampled.pop(task)
        yield as_pairs(with_photos(table, photos) if task in image_tasks else table, task, settings)


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
