"""`moon ingest-queries FILE`: a labelled query set a user brought in -> the `labelled_queries` table.

A labelled query set is queries matched to products by people: shoppers' photos matched to
the product by hand, text queries with judged results. The file is CSV or JSONL, one query
per row, with these columns (JSONL: keys):

- `query_text` and/or `query_image`: the text, and the photo's file path (relative to the
  file's folder, or absolute); a row needs at least one of them;
- `item_ids`: every item that counts as a hit. CSV: ids separated by `|` or `;`, or a JSON
  list (`["a", "b"]`); JSONL: a list;
- `split` (optional): train or test. Left empty, a query is test with chance
  `ingest.labelled_test_share`, decided by a hash of its id, so it keeps its split whenever
  the set is ingested again;
- `query_id` (optional): the file's own id; else the id of the query itself
  (`moon.queries.query_id`: its photo's bytes, or its normalised text).

The catalogue comes first: every item id must be an item of the run. A row that cannot be
used goes to `labelled_queries_rejects.parquet` (the REJECTS schema) with its reason
(`schema.LABELLED_REJECT_REASONS`) and never stops the ingest; the catalogue's own
`rejects.parquet` is left alone.

Ingesting again replaces the whole labelled set, and says what it replaced: the file is the
user's own, so the latest file is the set (to add queries, add rows to the file).
The train split joins both post-training stages (`moon pairs`), the test split is a query set of
`moon eval retrieval`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from moon import ui
from moon.config import MoonConfig
from moon.errors import Rejected, UserError
from moon.io.atomic import atomic_parquet
from moon.io.images import check_image, pixel_limit, read_image_file
from moon.io.schema import LABELLED_QUERIES, LABELLED_REJECT_REASONS, LABELLED_SPLITS, REJECTS
from moon.io.tables import TableWriter, has_table, read_manifest, read_table
from moon.queries import query_id as derived_query_id
from moon.run import RunDir
from moon.sources.catalogue import Record, clean_text, file_records

TABLE = "labelled_queries"
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
QUERY_COLUMNS = ("query_text", "query_image")
ITEMS_COLUMN = "item_ids"
ITEM_SEPARATORS = re.compile(r"[|;]")


@dataclass
class LabelledSummary:
    """What an ingest of a labelled set kept and rejected; `rows()` feeds `ui.print_table`."""

    source: str
    kept: int
    splits: dict[str, int]
    rejected_by_reason: dict[str, int]
    seconds: float
    replaced: str | None  # what the run held before, if anything

    @property
    def rejected(self) -> int:
        return sum(self.rejected_by_reason.values())

    def rows(self) -> list[tuple]:
        rows = [("kept", self.kept), *((f"kept: {split} split", n) for split, n in self.splits.items())]
        rows += [(f"rejected: {reason}", n) for reason, n in self.rejected_by_reason.items() if n]
        rows.append(("rejected (total)", self.rejected))
        rows.append(("seconds", f"{self.seconds:.2f}"))
        return rows


def ingest_queries(source: Path, config: MoonConfig, run_dir: Path) -> LabelledSummary:
    """Reads a labelled query file into `run_dir/labelled_queries`, its bad rows into the labelled rejects."""
    started = time.perf_counter()
    file, fmt = open_file(Path(source))
    builder = QueryBuilder(known_items(run_dir), file.parent, config.ingest.labelled_test_share,
                           config.ingest.max_image_pixels)
    run = RunDir(run_dir)
    before = describe_current(run_dir)
    with TableWriter(run_dir, TABLE, LABELLED_QUERIES) as writer, pixel_limit(config.ingest.max_image_pixels):
        kept, rejects = _build_rows(file_records(file, fmt), builder)
        writer.write(pa.Table.from_pylist(kept, schema=LABELLED_QUERIES))
        # Rejects first: whoever sees the new labelled set also sees its rejects.
        atomic_parquet(pa.Table.from_pylist(rejects, schema=REJECTS), run.labelled_rejects)
        if not kept:
            raise _nothing_kept(file, rejects, run)
        by_reason = Counter(reject["reason"] for reject in rejects)
        splits = Counter(row["split"] for row in kept)
        summary = LabelledSummary(
            source=str(file), kept=len(kept), splits={split: splits[split] for split in LABELLED_SPLITS},
            rejected_by_reason={reason: by_reason[reason] for reason in LABELLED_REJECT_REASONS},
            seconds=round(time.perf_counter() - started, 2),
            replaced=f"replaced the labelled set in {run.table(TABLE)}: {before}" if before else None,
        )
        writer.commit(**_manifest(summary, fmt, kept, config))
    return summary


def _manifest(summary: LabelledSummary, fmt: str, kept: list[dict], config: MoonConfig) -> dict:
    """What the labelled table's manifest says: real labelled data a user brought in, and what it holds."""
    return {
        "stage": "ingest-queries", "source": summary.source, "format": fmt,
        "simulated": False, "labelled": True, "data": "labelled queries a user brought in (not made by the simulator)",
        "kept": summary.kept, "splits": summary.splits, "kinds": dict(Counter(_kind(row) for row in kept)),
        "rejected": summary.rejected, "rejects_by_reason": summary.rejected_by_reason,
        "content_digest": content_digest(kept), "test_share": config.ingest.labelled_test_share,
        "config_digest": config.digest("ingest"), "seconds": summary.seconds,
    }


def open_file(path: Path) -> tuple[Path, str]:
    """The labelled file and its format (csv or jsonl, from the suffix), or a UserError saying what is wrong."""
    path = path.expanduser().resolve()
    if not path.is_file():
        raise UserError(f"labelled query file {path} not found: pass a CSV or JSONL file "
                        "(columns query_text and/or query_image, item_ids, optional split)")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"cannot tell the format of {path} from its suffix '{path.suffix}': "
                        f"name it {' or '.join(FORMATS)}")
    if fmt == "csv":
        _check_csv_header(path)
    return path, fmt


def _check_csv_header(file: Path) -> None:
    """A CSV without the query or item columns is the wrong file: say so once instead of rejecting every row."""
    with open(file, newline="", encoding="utf-8-sig") as handle:  # spreadsheets add a byte-order mark
        header = [name.strip() for name in next(csv.reader(handle), [])]
    if ITEMS_COLUMN not in header or not any(column in header for column in QUERY_COLUMNS):
        raise UserError(f"{file} needs the columns {ITEMS_COLUMN} and query_text and/or query_image "
                        f"(columns found: {', '.join(header) or 'none'})")


def known_items(run_dir: Path) -> set[str]:
    """The catalogue's item ids: labelled items must be among them."""
    if not has_table(run_dir, "items"):
        raise UserError(f"no items table in {run_dir}: ingest (`moon ingest`) or simulate the catalogue first; "
                        "labelled queries name its items")
    return set(read_table(run_dir, "items", columns=["item_id"])["item_id"].to_pylist())


def describe_current(run_dir: Path) -> str | None:
    """The labelled set the run holds now, in words, or None."""
    if not has_table(run_dir, TABLE):
        return None
    manifest = read_manifest(run_dir, TABLE)
    return (f"{manifest.get('rows', 0):,} queries from {manifest.get('source', 'an earlier file')}, "
            f"ingested {manifest.get('created_at', 'earlier')}")


def _build_rows(records, builder: QueryBuilder) -> tuple[list[dict], list[dict]]:
    kept, rejects = [], []
    with ui.progress("ingest labelled queries", None, unit="rows") as advance:
        for record in records:
            try:
                kept.append(builder.build(record))
            except Rejected as exc:  # an ImageError too
                rejects.append(_reject_row(record, exc))
            advance(1)
    return kept, rejects


class QueryBuilder:
    """Turns one row of the file into a labelled query, or raises Rejected / ImageError saying why not."""

    def __init__(self, items: set[str], folder: Path, test_share: float, max_pixels: int):
        self.items, self.folder = items, folder
        self.test_share, self.max_pixels = test_share, max_pixels
        self.kept: dict[str, int] = {}  # query id -> the line it was kept from

    def build(self, record: Record) -> dict:
        if record.values is None:
            raise Rejected("malformed_line", record.error)
        values = record.values
        text, image_name = clean_text(values.get("query_text")), clean_text(values.get("query_image"))
        if text is None and image_name is None:
            raise Rejected("no_query", "query_text and query_image are both empty")
        items = self._items(values.get(ITEMS_COLUMN))
        split = parse_split(values.get("split"))
        # Last: reading and decoding the photo is by far the most expensive check.
        image = None if image_name is None else check_image(self._image_bytes(image_name), self.max_pixels)
        key = clean_text(values.get("query_id")) or derived_query_id(text, image)
        if key in self.kept:
            raise Rejected("duplicate_id", f"query {key} already kept from line {self.kept[key]}")
        self.kept[key] = record.number
        return {"query_id": key, "query_text": text, "query_image": image, "item_ids": items,
                "split": split or default_split(key, self.test_share), "source": str(record.file),
                "row": record.number}

    def _items(self, value) -> list[str]:
        items = parse_item_ids(value)
        if not items:
            raise Rejected("no_items", f"{ITEMS_COLUMN} is empty: a labelled query needs at least one relevant item")
        unknown = [item for item in items if item not in self.items]
        if unknown:
            rejected = Rejected("unknown_item", f"{len(unknown)} of {len(items)} items are not in the catalogue: "
                                f"{', '.join(unknown[:5])}")
            rejected.item_id = unknown[0]
            raise rejected
        return items

    def _image_bytes(self, name: str) -> bytes:
        path = Path(name).expanduser()
        path = path if path.is_absolute() else self.folder / path
        return read_image_file(path)


def parse_item_ids(value) -> list[str]:
    """Relevant item ids from a list, a JSON list, or ids separated by `|` or `;`; each once, in order."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        values = value
    else:
        text = str(value).strip()
        values = _json_list(text) if text.startswith("[") else ITEM_SEPARATORS.split(text)
    ids = (clean_text(v) for v in values)
    return list(dict.fromkeys(item for item in ids if item is not None))


def _json_list(text: str) -> list:
    try:
        values = json.loads(text)
    except ValueError:
        values = None
    if not isinstance(values, list):
        raise Rejected("malformed_line", f"{ITEMS_COLUMN} {text!r} is not a JSON list of ids")
    return values


def parse_split(value) -> str | None:
    """The row's own split (train or test, any case), None when it has none."""
    text = clean_text(value)
    if text is None:
        return None
    if text.lower() not in LABELLED_SPLITS:
        raise Rejected("bad_split", f"split {text!r} is not one of {', '.join(LABELLED_SPLITS)} (or empty)")
    return text.lower()


def default_split(key: str, test_share: float) -> str:
    """test with chance `test_share`, by a hash of the query id: the same query always lands alike."""
    draw = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 2**32
    return "test" if draw < test_share else "train"


def content_digest(rows: list[dict]) -> str:
    """A hash of what the set says (queries, photos, items, splits), not of when it was ingested: the
    pairs stage rebuilds when it changes, and not when the same file is ingested again."""
    digest = hashlib.sha256()
    for row in rows:
        photo = hashlib.sha1(row["query_image"]).hexdigest() if row["query_image"] is not None else ""
        fields = (row["query_id"], row["query_text"] or "", photo, "|".join(row["item_ids"]), row["split"])
        digest.update(("\t".join(fields) + "\n").encode())
    return digest.hexdigest()[:16]


def _kind(row: dict) -> str:
    if row["query_image"] is not None and row["query_text"] is not None:
        return "text+image"
    return "image" if row["query_image"] is not None else "text"


def _reject_row(record: Record, exc: Exception) -> dict:
    return {"source": str(record.file), "row": record.number, "item_id": getattr(exc, "item_id", None),
            "reason": exc.reason, "detail": str(exc)}


def _nothing_kept(file: Path, rejects: list[dict], run: RunDir) -> UserError:
    """An empty set is almost always a wrong file, image folder or catalogue."""
    if not rejects:
        return UserError(f"{file} has no rows: nothing to ingest")
    reason, count = Counter(reject["reason"] for reject in rejects).most_common(1)[0]
    example = next(reject["detail"] for reject in rejects if reject["reason"] == reason)
    return UserError(f"no row of {file} could be used: {count:,} of {len(rejects):,} rows rejected as {reason} "
                     f"(e.g. {example}); the labelled set in {run.root} is unchanged. "
                     f"Every reject is in {run.labelled_rejects}")
