"""The behaviour log as the pair builder reads it: the catalogue's per-item facts, and one interaction
per (session, item) with its strongest action, its split by day and the session's user photo, kept on
disk in time order and read back a batch at a time.

Memory does not grow with the log (`spill.py` has the two layouts):

1. the events are read once, a batch at a time: impressions add to per-item counts, and
   the click, cart and purchase rows and each session's first photo are spilled into
   parts by session;
2. each part in turn becomes one interaction per (session, item), with its photo and
   split, and the session's item pairs, spilled again into buckets of time;
3. each bucket is sorted; read in turn, the buckets give the whole log in time order.

A session part holds about PART_BATCHES batches of events and a time bucket about half a
batch of interactions (`pairs.batch_rows`), so a smaller batch makes everything smaller.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from moon import ui
from moon.config import MoonConfig, PairsConfig
from moon.errors import UserError
from moon.io import schema
from moon.io.tables import dataset, has_table, read_batches, read_manifest, table_path
from moon.pairs.accounting import Accounting
from moon.pairs.spill import SORTED_ROW_GROUP, Spill, TimeBuckets, part_count, session_parts
from moon.run import MANIFEST
from moon.sources.summary import leaf_categories

ACTION_RANK = {"click": 1, "cart": 2, "purchase": 3}
MS_PER_DAY = 86_400_000
PART_BATCHES = 2  # event batches per session part
INTERACTION_COLUMNS = ["ts", "user_id", "session_id", "region", "query_text", "item_id", "action"]
INTERACTION_ORDER = ["ts", "session_id", "item_id"]
ITEM_PAIR_ORDER = ["ts", "session_id", "query_item_id", "item_id"]

# The click, cart and purchase rows of the events, as spilled by session.
ACTED = pa.schema([(name, schema.EVENTS.field(name).type) for name in INTERACTION_COLUMNS] + [("image_query", pa.bool_())])
PHOTOS = pa.schema([("session_id", pa.string()), ("photo", pa.binary())])
# One row per (session, item); `photo` is the session's user photo, null for a text query.
INTERACTIONS = pa.schema([
    ("session_id", pa.string()), ("item_id", pa.string()), ("action", pa.string()), ("ts", schema.TIMESTAMP),
    ("user_id", pa.string()), ("region", pa.string()), ("query_text", pa.string()), ("image_query", pa.bool_()),
    ("split", pa.string()), ("photo", pa.binary()),
])
# Two items one session interacted with: the earlier is the query; the other columns are the later one's.
ITEM_PAIRS = pa.schema([
    ("session_id", pa.string()), ("query_item_id", pa.string()), ("item_id", pa.string()), ("action", pa.string()),
    ("ts", schema.TIMESTAMP), ("user_id", pa.string()), ("region", pa.string()), ("split", pa.string()),
])


@dataclass
class Catalogue:
    """Per-item facts the pair builder needs, indexed by item id; the images stay on disk."""

    ids: pa.Array  # string, for vectorised lookups
    item_ids: np.ndarray  # object: str
    spu: np.ndarray  # object: str
    leaf: np.ndarray  # int: leaf category code
    items: pa.Table  # every column of the items but the images
    source: pa.Table | ds.FileSystemDataset  # the items with their images, read a chunk at a time

    @classmethod
    def of(cls, source: pa.Table | ds.FileSystemDataset) -> Catalogue:
        """The facts of an items table, or of a dataset of one (its images are not read here)."""
        facts = [name for name in source.schema.names if name != "image"]
        items = source.select(facts) if isinstance(source, pa.Table) else source.to_table(columns=facts)
        ids = np.array(items["item_id"].to_pylist(), dtype=object)
        _, leaf = np.unique(leaf_categories(items["category"]).to_numpy(zero_copy_only=False), return_inverse=True)
        spu = np.array(items["spu_id"].to_pylist(), dtype=object)
        return cls(items["item_id"].combine_chunks(), ids, spu, leaf, items, source)

    @classmethod
    def read(cls, run_dir: Path) -> Catalogue:
        return cls.of(dataset(run_dir, "items"))

    def chunks(self, columns: list[str], rows: int) -> Iterator[pa.Table]:
        """The items in catalogue order, `rows` at a time (the last chunk may be shorter)."""
        return blocks(read_batches(self.source, columns, rows), rows)

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


Where = dict  # a row filter: column -> the value it must equal, or a pa.Array of values it must be one of


@dataclass
class BehaviourLog:
    interactions: ds.FileSystemDataset  # INTERACTIONS in time order (ts, session_id, item_id)
    item_pairs: ds.FileSystemDataset  # ITEM_PAIRS in time order (ts, session_id, query_item_id, item_id)
    impressions: np.ndarray  # impressions per catalogue item
    period_start_ms: int
    days: int
    batch_rows: int

    def scan(self, columns: list[str] | None = None, where: Where | None = None,
             table: str = "interactions") -> Iterator[pa.Table]:
        """The rows of `table` (interactions or item_pairs) that match `where`, in time order, a batch at a time."""
        source = getattr(self, table)
        where = where or {}
        wanted = columns or source.schema.names
        for part in read_batches(source, list(dict.fromkeys([*wanted, *where])), self.scan_rows):
            part = part.filter(matches(part, where)) if where else part
            if part.num_rows:
                yield part.select(wanted)

    def count(self, where: Where | None = None, table: str = "interactions") -> int:
        """Rows of `table` that match `where`."""
        if not where:
            return getattr(self, table).count_rows()
        parts = read_batches(getattr(self, table), list(where), self.scan_rows)
        return sum(int(pc.sum(matches(part, where)).as_py() or 0) for part in parts)

    @property
    def scan_rows(self) -> int:
        """Rows read from the spill at once: at most a row group, as rows with photos are large."""
        return min(self.batch_rows, SORTED_ROW_GROUP)

    def query_texts(self) -> list[str]:
        """The distinct query texts, in the order they first occur."""
        seen: dict[str, None] = {}
        for part in self.scan(["query_text"], {"image_query": False}):
            seen.update(dict.fromkeys(pc.unique(part["query_text"].drop_null()).to_pylist()))
        return list(seen)


def matches(table: pa.Table, where: Where) -> pa.ChunkedArray:
    """Which rows match every condition of `where`."""
    masks = [
        pc.is_in(table[column], value_set=value) if isinstance(value, pa.Array) else pc.equal(table[column], value)
        for column, value in where.items()
    ]
    return functools.reduce(pc.and_, masks)


LOG_SECTIONS = ("world", "behaviour", "ingest")  # the config sections that make a simulated log


def log_digest(config: MoonConfig, run_dir: Path, *sections: str) -> str:
    """The digest a table made from the log carries: its config sections and those that make a simulated
    log, plus, for a log a user ingested (which no config describes), the log's own manifest, so that a
    part appended to it makes the pairs and the CTR samples again."""
    digest = config.digest(*LOG_SECTIONS, *sections)
    if not has_table(run_dir, "events") or read_manifest(run_dir, "events").get("simulated") is not False:
        return digest
    manifest = (table_path(run_dir, "events") / MANIFEST).read_bytes()
    return hashlib.sha256(digest.encode() + manifest).hexdigest()[:16]


def read_interactions(
    run_dir: Path, settings: PairsConfig, catalogue: Catalogue, accounting: Accounting, work: Path
) -> BehaviourLog:
    """Streams the events into one interaction per (session, item), spilled into `work` in time order."""
    manifest = read_manifest(run_dir, "events")
    start_ms, days = int(np.datetime64(manifest["period_start"], "ms").astype(np.int64)), int(manifest["days"])
    check_split_days(days, settings)
    buckets = TimeBuckets(start_ms, start_ms + days * MS_PER_DAY)
    acted, photos, impressions = _spill_by_session(run_dir, settings, catalogue, buckets, work)
    interactions, item_pairs = _group_sessions(acted, photos, buckets, start_ms, days, settings, accounting, work)
    with ui.progress("sort by time", 2 * buckets.count, unit="parts") as advance:
        in_order = interactions.sort_parts(INTERACTION_ORDER, advance), item_pairs.sort_parts(ITEM_PAIR_ORDER, advance)
    return BehaviourLog(*in_order, impressions, start_ms, days, settings.batch_rows)


def _spill_by_session(run_dir, settings, catalogue, buckets, work) -> tuple[Spill, Spill, np.ndarray]:
    """Reads the events once: impressions per item; acted rows and first photos spilled by session;
    the acted rows' times counted into `buckets`."""
    events = dataset(run_dir, "events")
    total = events.count_rows()
    acted = Spill(work / "acted", ACTED, part_count(total, PART_BATCHES * settings.batch_rows))
    photos = Spill(work / "photos", PHOTOS, acted.parts)
    impressions = np.zeros(len(catalogue.item_ids), dtype=np.int64)
    with ui.progress("read behaviour log", total, unit="events") as advance:
        for table in read_batches(events, [*INTERACTION_COLUMNS, "query_image"], settings.batch_rows):
            shown = pc.equal(table["action"], "impression")
            codes = catalogue.codes(table["item_id"])  # every row's item must be in the catalogue
            impressions += np.bincount(codes[shown.to_numpy(zero_copy_only=False)], minlength=len(impressions))
            rows = table.filter(pc.invert(shown))
            rows = rows.append_column("image_query", query_kind(rows)).drop_columns(["query_image"])
            acted.write(rows, session_parts(rows["session_id"], acted.parts))
            first = first_photos(table)
            photos.write(first, session_parts(first["session_id"], photos.parts))
            buckets.add(rows["ts"])
            advance(table.num_rows)
    acted.close()
    photos.close()
    return acted, photos, impressions


def query_kind(events: pa.Table) -> pa.Array:
    """Whether each row's session searched with a photo (True) or a text (False); null where it
    searched with neither (a browsing log, such as Taobao's: its sessions feed item -> item pairs only)."""
    has_text, has_photo = pc.is_valid(events["query_text"]), pc.is_valid(events["query_image"])
    nothing = pa.nulls(events.num_rows, pa.bool_())
    return pc.if_else(has_text, False, pc.if_else(has_photo, True, nothing))


def first_photos(events: pa.Table) -> pa.Table:
    """(session_id, photo): the first user photo of each session in these events."""
    first = first_photo_rows(events, "query_image")
    return events.select(["session_id", "query_image"]).take(first["row"]).rename_columns(PHOTOS.names)


def first_photo_rows(rows: pa.Table, column: str) -> pa.Table:
    """(session_id, row): the row of each session's first photo (in `column`), found without copying photos."""
    numbered = pa.table({"session_id": rows["session_id"], "row": np.arange(rows.num_rows)})
    numbered = numbered.filter(pc.is_valid(rows[column]))
    return numbered.group_by("session_id", use_threads=False).aggregate([("row", "min")]).rename_columns(["session_id", "row"])


def _group_sessions(acted, photos, buckets, start_ms, days, settings, accounting, work) -> tuple[Spill, Spill]:
    """Per session part: interactions with their photos and splits, and item pairs, spilled by time."""
    buckets.split(max(settings.batch_rows // 2, 1))
    interactions = Spill(work / "interactions", INTERACTIONS, buckets.count)
    item_pairs = Spill(work / "item_pairs", ITEM_PAIRS, buckets.count)
    rows_in = kept = 0
    with ui.progress("group sessions", acted.parts, unit="parts") as advance:
        for part in range(acted.parts):
            rows = acted.read(part)
            table = strongest_per_session_item(rows)
            table = with_photos(table, photos.read(part))
            table = assign_splits(table, start_ms, days, settings)
            interactions.write(table, buckets.of(table["ts"]))
            pairs = items_of_one_session(table)
            item_pairs.write(pairs, buckets.of(pairs["ts"]))
            rows_in, kept = rows_in + rows.num_rows, kept + table.num_rows
            acted.remove(part)
            photos.remove(part)
            advance(1)
    accounting.record(
        "interactions", "one per (session, item)", rows_in, kept,
        **{"weaker action, same session and item": rows_in - kept},
    )
    return interactions, item_pairs


def strongest_per_session_item(rows: pa.Table) -> pa.Table:
    """One row per (session, item), with its strongest action and the time of its first action."""
    rank = pc.add(pc.index_in(rows["action"], value_set=pa.array(list(ACTION_RANK))), 1)
    rows = rows.append_column("rank", rank)
    grouped = rows.group_by(["session_id", "item_id"], use_threads=False).aggregate(
        [("rank", "max"), ("ts", "min"), ("user_id", "first"), ("region", "first"),
         ("query_text", "first"), ("image_query", "first")]
    )
    action = pa.array(list(ACTION_RANK)).take(pc.subtract(grouped["rank_max"], 1))
    return pa.table({
        "session_id": grouped["session_id"],
        "item_id": grouped["item_id"],
        "action": action,
        "ts": grouped["ts_min"],
        "user_id": grouped["user_id_first"],
        "region": grouped["region_first"],
        "query_text": grouped["query_text_first"],
        "image_query": grouped["image_query_first"],
    })


def with_photos(interactions: pa.Table, photos: pa.Table) -> pa.Table:
    """Adds each photo-query interaction's user photo (column `photo`; null for a text query).

    `photos`: (session_id, photo) rows in the log's order; a session's first is its photo.
    """
    first = first_photo_rows(photos, "photo")
    row = first["row"].take(pc.index_in(interactions["session_id"], value_set=first["session_id"]))
    row = pc.if_else(interactions["image_query"], row, pa.scalar(None, pa.int64()))
    return interactions.append_column("photo", photos["photo"].take(row))


def items_of_one_session(interactions: pa.Table) -> pa.Table:
    """Ordered (earlier item -> later item) pairs of items one session interacted with."""
    later_items = interactions.select([n for n in ITEM_PAIRS.names if n != "query_item_id"])
    left = interactions.select(["session_id", "item_id", "ts"]).rename_columns(["session_id", "query_item_id", "query_ts"])
    joined = left.join(later_items, keys="session_id", join_type="inner", use_threads=False)
    later = pc.or_(
        pc.less(joined["query_ts"], joined["ts"]),
        pc.and_(pc.equal(joined["query_ts"], joined["ts"]), pc.less(joined["query_item_id"], joined["item_id"])),
    )
    return joined.filter(pc.and_(pc.not_equal(joined["query_item_id"], joined["item_id"]), later))


def check_split_days(days: int, settings: PairsConfig) -> None:
    if settings.test_days + settings.valid_days >= days:
        raise UserError(
            f"the log has {days} days but pairs.test_days={settings.test_days} and pairs.valid_days="
            f"{settings.valid_days} leave none for training: lower them or simulate more days"
        )


def assign_splits(interactions: pa.Table, start_ms: int, days: int, settings: PairsConfig) -> pa.Table:
    """train / valid / test by event day: evaluation comes from later days than any training pair."""
    day = (interactions["ts"].cast(pa.int64()).to_numpy() - start_ms) // MS_PER_DAY
    return interactions.append_column("split", pa.array(split_of_days(day, days, settings), pa.string()))


def split_starts(days: int, settings: PairsConfig) -> tuple[int, int]:
    """(first test day, first valid day) of a log of `days` days, counted from its first day."""
    test_from = days - settings.test_days
    return test_from, test_from - settings.valid_days


def split_of_days(day: np.ndarray, days: int, settings: PairsConfig) -> np.ndarray:
    """The split of each day index: the last `test_days` test, the `valid_days` before them valid, the rest
    train. Pairs, CTR samples and the click ceilings all split the log this one way."""
    test_from, valid_from = split_starts(days, settings)
    return np.where(day >= test_from, "test", np.where(day >= valid_from, "valid", "train"))


# ---------------------------------------------------------------- reading in order


def take_rows(parts: Iterable[pa.Table], positions: np.ndarray) -> Iterator[pa.Table]:
    """The rows at `positions` (sorted) of the table the parts make in turn, in order."""
    if not len(positions):
        return
    offset = 0
    for part in parts:
        lo, hi = np.searchsorted(positions, [offset, offset + part.num_rows])
        if hi > lo:
            yield part.take(positions[lo:hi] - offset)
        offset += part.num_rows
        if hi == len(positions):
            return


def blocks(parts: Iterable[pa.Table], rows: int) -> Iterator[pa.Table]:
    """The table the parts make, cut anew into blocks of `rows` rows (the last may be shorter)."""
    pending: list[pa.Table] = []
    size = 0
    for part in parts:
        pending.append(part)
        size += part.num_rows
        while size >= rows:
            joined = pa.concat_tables(pending)
            yield joined.slice(0, rows)
            pending, size = [joined.slice(rows)], size - rows
    if size:
        yield pa.concat_tables(pending)
