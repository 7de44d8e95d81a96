"""The behaviour log as the pair builder reads it: the catalogue's per-item facts, one interaction per
(session, item) with its strongest action and its split by day, and the user photos of chosen sessions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from moon import ui
from moon.config import PairsConfig
from moon.errors import UserError
from moon.io.tables import dataset, read_manifest
from moon.pairs.accounting import Accounting
from moon.sources.summary import leaf_categories

ACTION_RANK = {"click": 1, "cart": 2, "purchase": 3}
MS_PER_DAY = 86_400_000
READAHEAD = {"batch_readahead": 2, "fragment_readahead": 1}  # bounds memory: photo batches are large


@dataclass
class Catalogue:
    """Per-item facts the pair builder needs, indexed by item id."""

    ids: pa.Array  # string, for vectorised lookups
    item_ids: np.ndarray  # object: str
    spu: np.ndarray  # object: str
    leaf: np.ndarray  # int: leaf category code

    @classmethod
    def of(cls, items: pa.Table) -> Catalogue:
        ids = np.array(items["item_id"].to_pylist(), dtype=object)
        _, leaf = np.unique(leaf_categories(items["category"]).to_numpy(zero_copy_only=False), return_inverse=True)
        spu = np.array(items["spu_id"].to_pylist(), dtype=object)
        return cls(items["item_id"].combine_chunks(), ids, spu, leaf)

    def codes(self, item_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Catalogue positions of item ids; an id the catalogue lacks is a user error."""
        codes = pc.index_in(item_ids, value_set=self.ids)
        if codes.null_count:
            missing = pc.filter(item_ids, pc.is_null(codes))[0]
            raise UserError(
                f"the behaviour log names item {missing} that the items table lacks: ingest or simulate "
                "the catalogue and the log into the same run directory"
            )
        return codes.to_numpy(zero_copy_only=False).astype(np.int64)


@dataclass
class BehaviourLog:
    interactions: pa.Table  # one row per (session, item): strongest action, split, query text
    impressions: np.ndarray  # impressions per catalogue item
    period_start_ms: int
    days: int


INTERACTION_COLUMNS = ["ts", "user_id", "session_id", "region", "query_text", "item_id", "action"]


def read_interactions(run_dir: Path, settings: PairsConfig, catalogue: Catalogue, accounting: Accounting) -> BehaviourLog:
    """Streams the events (without the photo bytes) and keeps one interaction per (session, item).

    A session searched with a photo exactly when its query text is null (the events contract),
    so the photo column is not read here.
    """
    manifest = read_manifest(run_dir, "events")
    events = dataset(run_dir, "events")
    impressions = np.zeros(len(catalogue.item_ids), dtype=np.int64)
    kept: list[pa.Table] = []
    total = events.count_rows()
    with ui.progress("read behaviour log", total, unit="events") as advance:
        for batch in events.to_batches(columns=INTERACTION_COLUMNS, batch_size=settings.batch_rows, **READAHEAD):
            table = pa.Table.from_batches([batch])
            shown = pc.equal(table["action"], "impression")
            impressions += np.bincount(catalogue.codes(table.filter(shown)["item_id"]), minlength=len(impressions))
            acted = table.filter(pc.invert(shown))
            kept.append(acted.append_column("image_query", pc.is_null(acted["query_text"])))
            advance(batch.num_rows)
    rows = pa.concat_tables(kept) if kept else pa.table({c: [] for c in INTERACTION_COLUMNS})
    interactions = strongest_per_session_item(rows)
    accounting.record(
        "interactions", "one per (session, item)", rows.num_rows, interactions.num_rows,
        **{"weaker action, same session and item": rows.num_rows - interactions.num_rows},
    )
    start_ms = int(np.datetime64(manifest["period_start"], "ms").astype(np.int64))
    interactions = assign_splits(interactions, start_ms, int(manifest["days"]), settings)
    return BehaviourLog(interactions, impressions, start_ms, int(manifest["days"]))


def strongest_per_session_item(rows: pa.Table) -> pa.Table:
    """One row per (session, item), with its strongest action and the time of its first action."""
    rank = pc.add(pc.index_in(rows["action"], value_set=pa.array(list(ACTION_RANK))), 1)
    rows = rows.append_column("rank", rank)
    grouped = rows.group_by(["session_id", "item_id"], use_threads=False).aggregate(
        [("rank", "max"), ("ts", "min"), ("user_id", "first"), ("region", "first"),
         ("query_text", "first"), ("image_query", "first")]
    )
    action = pa.array(list(ACTION_RANK)).take(pc.subtract(grouped["rank_max"], 1))
    table = pa.table({
        "session_id": grouped["session_id"],
        "item_id": grouped["item_id"],
        "action": action,
        "ts": grouped["ts_min"],
        "user_id": grouped["user_id_first"],
        "region": grouped["region_first"],
        "query_text": grouped["query_text_first"],
        "image_query": grouped["image_query_first"],
    })
    return table.sort_by([("ts", "ascending"), ("session_id", "ascending"), ("item_id", "ascending")])


def assign_splits(interactions: pa.Table, start_ms: int, days: int, settings: PairsConfig) -> pa.Table:
    """train / valid / test by event day: evaluation comes from later days than any training pair."""
    if settings.test_days + settings.valid_days >= days:
        raise UserError(
            f"the log has {days} days but pairs.test_days={settings.test_days} and pairs.valid_days="
            f"{settings.valid_days} leave none for training: lower them or simulate more days"
        )
    day = (interactions["ts"].cast(pa.int64()).to_numpy() - start_ms) // MS_PER_DAY
    test_from = days - settings.test_days
    valid_from = test_from - settings.valid_days
    split = np.where(day >= test_from, "test", np.where(day >= valid_from, "valid", "train"))
    return interactions.append_column("split", pa.array(split, pa.string()))


# ---------------------------------------------------------------- stage 1


def with_photos(table: pa.Table, photos: pa.Table) -> pa.Table:
    """Adds each row's user photo (column `photo`), keeping the time order."""
    joined = table.join(photos, keys="session_id", join_type="left outer", use_threads=False)
    order = [("ts", "ascending"), ("session_id", "ascending"), ("item_id", "ascending")]
    return joined.sort_by(order)


def session_photos(run_dir: Path, sessions: pa.Array, settings: PairsConfig) -> pa.Table:
    """(session_id, photo) for the given sessions, read from the events in streamed batches.

    Each photo is copied once, from the first row of its session; the parts are then
    concatenated without copying, so memory holds the wanted photos and one batch.
    """
    photo_schema = pa.schema([("session_id", pa.string()), ("photo", pa.binary())])
    parts = [photo_schema.empty_table()]
    seen: set[str] = set()
    events = dataset(run_dir, "events")
    wanted = pc.field("session_id").isin(sessions) & pc.field("query_image").is_valid()
    batches = events.to_batches(columns=["session_id", "query_image"], filter=wanted, batch_size=settings.batch_rows, **READAHEAD)
    for batch in batches:
        first_rows = []
        for row, session in enumerate(batch.column("session_id").to_pylist()):
            if session not in seen:
                seen.add(session)
                first_rows.append(row)
        rows = pa.array(first_rows, pa.int64())
        parts.append(pa.Table.from_batches([batch]).take(rows).rename_columns(photo_schema.names).cast(photo_schema))
    return pa.concat_tables(parts)
