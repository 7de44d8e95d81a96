"""Items added while the service runs (`POST /v1/admin/items`): checked, embedded, kept.

**Where they are kept.** An added item is written twice, each time through a path the run
directory already has, so every later stage sees it as it sees an item `moon embed
--incremental` added:

1. its row, in the `items` schema, is appended to the run's `served_items` table (the
   earlier rows carried over, as `moon ingest-log` appends a log): the record of what was
   added, the category path a filtered search needs, and the input a later version is
   embedded from;
2. its vector, made by the serving model in the view the model serves, is added to the
   served store version by `StoreVersion.add`, the very call `moon embed --incremental`
   makes (a `part-inc-<time>.parquet` shard, then the manifest, each by rename). `moon
   index` then folds it into the version's index like any incremental item.

The row is written first: if the service stops between the two writes, the next load finds
a served item the version lacks and embeds it then. That same catch-up runs whenever the
service loads a version made by the serving model (a newer `moon embed`, say), so items added
through the service stay searchable across versions. A version made by another model cannot
be given them (the serving model's vectors do not compare with its own); the service says
how many it lacks.

An item the version already holds is refused: a stored vector never changes within a version
(as `VectorIndex.add` refuses a known id); a changed item gets its new vector in the next
version `moon embed` makes from a catalogue that holds it.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pyarrow as pa
from PIL import Image

from moon.config import ServeConfig
from moon.io.images import decode
from moon.io.schema import ITEMS
from moon.io.tables import TableWriter, has_table, read_table
from moon.model.inputs import Input
from moon.model.views import ItemViews
from moon.serve.limits import RequestError, catalogue_image, check_count, check_text, unusable

SERVED_ITEMS = "served_items"  # the table of items added through the service (items schema)
MAX_ID_CHARS = 256
MAX_LEVELS = 16  # levels of a category path


def category_paths(run_dir: Path) -> dict[str, tuple[str, ...]]:
    """item id -> category path (root -> leaf) of the catalogue and of the items added through the
    service (theirs count where both list an id: their vectors were made from them)."""
    paths: dict[str, tuple[str, ...]] = {}
    for table in ("items", SERVED_ITEMS):
        if has_table(run_dir, table):
            rows = read_table(run_dir, table, columns=["item_id", "category"])
            paths.update(zip(rows["item_id"].to_pylist(), map(tuple, rows["category"].to_pylist())))
    return paths


def served_ids(run_dir: Path) -> list[str]:
    if not has_table(run_dir, SERVED_ITEMS):
        return []
    return read_table(run_dir, SERVED_ITEMS, columns=["item_id"])["item_id"].to_pylist()


def served_rows(run_dir: Path, ids: Sequence[str]) -> pa.Table:
    """The rows of `served_items` with these ids (the latest row of an id added twice)."""
    table = read_table(run_dir, SERVED_ITEMS)
    latest = {item_id: row for row, item_id in enumerate(table["item_id"].to_pylist())}
    return table.take([latest[item_id] for item_id in ids])


def append_served(run_dir: Path, rows: pa.Table) -> None:
    """Appends `rows` to the `served_items` table: a new table version carrying the earlier shards."""
    with TableWriter(run_dir, SERVED_ITEMS, ITEMS) as writer:
        writer.carry(run_dir, SERVED_ITEMS)
        writer.write(rows)
        writer.commit(stage="serve", simulated=False, source="POST /v1/admin/items")


def item_inputs(rows: pa.Table, view: str, pixels: Sequence[Image.Image] | None = None) -> list[Input]:
    """The items as the serving model sees catalogue items in `view` (`ItemViews`, as `moon embed`
    builds them), each image handed over decoded (the model keeps no copy of request bytes)."""
    pixels = pixels if pixels is not None else [decode(data) for data in rows["image"].to_pylist()]
    inputs = ItemViews(rows).inputs(range(rows.num_rows), view)
    return [Input(one.text, pixels[row] if one.image is not None else None) for row, one in enumerate(inputs)]


def checked_rows(items: Sequence[Mapping], limits: ServeConfig) -> tuple[pa.Table, list[Image.Image]]:
    """The request's items as rows of the items schema, and their decoded images; refuses (413/422)
    anything `moon ingest` would reject, naming the item and the field."""
    check_count(len(items), limits.max_inputs, "items", "max_inputs")
    rows, pixels, seen = [], [], set()
    for position, item in enumerate(items):
        where = f"item {position}"
        row = checked_row(item, limits, where)
        if row["item_id"] in seen:
            raise unusable(f"{where}: item_id {row['item_id']!r} appears twice in this request")
        seen.add(row["item_id"])
        row["image"], image = catalogue_image(item["image"], limits, f"{where} ({row['item_id']})")
        rows.append(row)
        pixels.append(image)
    return pa.Table.from_pylist(rows, schema=ITEMS), pixels


def checked_row(item: Mapping, limits: ServeConfig, where: str) -> dict:
    item_id = item["item_id"].strip()
    if not item_id or len(item_id) > MAX_ID_CHARS:
        raise unusable(f"{where}: item_id must be 1 to {MAX_ID_CHARS} characters")
    where = f"{where} ({item_id})"
    category = [level.strip() for level in item["category"]]
    if not category or len(category) > MAX_LEVELS or not all(category):
        raise unusable(f"{where}: category must be its path from root to leaf, 1 to {MAX_LEVELS} non-empty names")
    price = item.get("price")
    if price is not None and (not math.isfinite(price) or price < 0):
        raise unusable(f"{where}: price must be a finite number, 0 or more (got {price!r})")
    attributes = dict(item.get("attributes") or {})
    for name, value in attributes.items():
        check_text(f"{name} {value}", limits, f"{where} attribute {name!r}")
    return {
        "item_id": item_id,
        "spu_id": item.get("spu_id") or item_id,
        "title": check_text(item["title"], limits, f"{where} title"),
        "category": category,
        "attributes": list(attributes.items()),
        "image": None,
        "shop_id": item.get("shop_id"),
        "price": price,
        "created_at": item.get("created_at") or dt.datetime.now(dt.UTC),
    }


def refuse_held(ids: Sequence[str], held, version: str) -> None:
    """409 for ids the version (or an earlier add) already holds: a stored vector never changes."""
    known = [item_id for item_id in ids if held(item_id)]
    if known:
        raise RequestError(409, f"{len(known)} item(s) are already in store version {version}, e.g. {known[0]!r}: "
                           "a stored vector never changes within a version; a changed item gets its new vector "
                           "in the next version `moon embed` makes")
