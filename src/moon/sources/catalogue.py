"""Real catalogues -> the `items` table, plus `rejects.parquet` for every row that could not be used.

Sources (`ingest.format`, or detected from the path):

- kaggle: the upstream Kaggle "Fashion Product Images" folder, `styles.csv` + `images/<id>.jpg`;
- parquet: a Parquet file or a folder of them, with inline image bytes, streamed in batches;
- csv / jsonl: a generic file plus a folder of image files (`ingest.image_dir`).

Columns are mapped by `ingest.columns`, or detected from the known layouts in LAYOUTS.
A bad row never stops the ingest: it becomes a reject with its file, row number and reason.
A problem with the whole source (missing path, unknown layout, unreadable file) is a UserError.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import math
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from moon import ui
from moon.config import ColumnMap, IngestConfig, MoonConfig
from moon.errors import Rejected, UserError
from moon.io.atomic import atomic_parquet
from moon.io.images import check_image, pixel_limit, read_image_file
from moon.io.schema import ITEMS, REJECT_REASONS, REJECTS
from moon.io.tables import TableWriter
from moon.run import MANIFEST, RunDir

# Column layouts recognised without configuration, tried in order. A layout matches when its
# id, title and category columns are all present; its other columns are used when present.
LAYOUTS: dict[str, ColumnMap] = {
    # MOON's own items columns; `attributes` is a map column, merged entry by entry.
    "moon": ColumnMap(
        attributes={"attributes": "attributes"},
        spu_id="spu_id",
        shop_id="shop_id",
        price="price",
        created_at="created_at",
    ),
    # The upstream Kaggle styles.csv; it has no image column: images are images/{id}.jpg.
    "kaggle-fashion": ColumnMap(
        item_id="id",
        title="productDisplayName",
        category=["masterCategory", "subCategory", "articleType"],
        attributes={"gender": "gender", "colour": "baseColour", "season": "season", "year": "year", "usage": "usage"},
    ),
    # The fashion catalogue as Parquet with inline JPEG bytes (shared/data/fashion-44k).
    "fashion-parquet": ColumnMap(
        category=["master_category", "sub_category", "article_type"],
        attributes={"colour": "base_colour", "usage": "usage"},
    ),
}

KAGGLE_STYLES = "styles.csv"
KAGGLE_IMAGES = "images"
PARQUET_BATCH_ROWS = 1024  # rows in memory at a time while streaming Parquet
# pandas writes integer columns that contain nulls as floats: "2012.0" means 2012.
_INTEGRAL_FLOAT = re.compile(r"-?\d+\.0+")


@dataclass
class IngestSummary:
    """What an ingest kept and rejected; `rows()` feeds `ui.print_table`."""

    source: str
    format: str
    layout: str
    kept: int
    rejected_by_reason: dict[str, int]
    seconds: float

    @property
    def rejected(self) -> int:
        return sum(self.rejected_by_reason.values())

    def rows(self) -> list[tuple]:
        rows = [("kept", self.kept)]
        rows += [(f"rejected: {reason}", n) for reason, n in self.rejected_by_reason.items() if n]
        rows.append(("rejected (total)", self.rejected))
        rows.append(("seconds", f"{self.seconds:.2f}"))
        return rows


class Record(NamedTuple):
    """One row of a source file: its values by column, or why it could not be parsed."""

    file: Path
    number: int  # 1-based line (CSV, JSONL) or row (Parquet) number in `file`
    values: dict[str, Any] | None
    error: str | None = None


@dataclass
class Source:
    """An opened catalogue: its files, column names, row count and where image files live."""

    path: Path
    format: str
    files: list[Path]
    columns: list[str]
    total_rows: int
    image_root: Path


def ingest(source: Path, config: MoonConfig, run_dir: Path, fmt: str | None = None) -> IngestSummary:
    """Reads a real catalogue into `run_dir/items` and `run_dir/rejects.parquet`."""
    started = time.perf_counter()
    settings = config.ingest
    src = open_source(Path(source), fmt or settings.format, settings)
    layout, columns = resolve_columns(settings.columns, src)
    builder = ItemBuilder(columns, settings, src.image_root, image_column=columns.image in src.columns)
    rejects_path = RunDir(run_dir).rejects
    with TableWriter(run_dir, "items", ITEMS) as writer, pixel_limit(settings.max_image_pixels):
        rejects = _write_items(read_records(src, columns), builder, writer, src.total_rows, settings.shard_rows)
        # Rejects first: whoever sees the new items table also sees its rejects.
        atomic_parquet(pa.Table.from_pylist(rejects, schema=REJECTS), rejects_path)
        if writer.rows == 0:
            raise _nothing_kept(src, rejects, rejects_path)
        by_reason = Counter(reject["reason"] for reject in rejects)
        summary = IngestSummary(
            source=str(src.path),
            format=src.format,
            layout=layout,
            kept=writer.rows,
            rejected_by_reason={reason: by_reason[reason] for reason in REJECT_REASONS},
            seconds=round(time.perf_counter() - started, 2),
        )
        writer.commit(
            stage="ingest",
            source=summary.source,
            format=summary.format,
            layout=layout,
            columns=columns.model_dump(),
            kept=summary.kept,
            rejected=summary.rejected,
            rejects_by_reason=summary.rejected_by_reason,
            seconds=summary.seconds,
            config_digest=config.digest("ingest"),
            simulated=False,
            **_source_lexicon(src),
        )
    return summary


def _source_lexicon(src: Source) -> dict:
    """A MOON items table brought in from another run keeps the entity lexicon its manifest records
    (the pair builder's named-entity filter reads it), so the catalogue is the same catalogue."""
    manifest = src.path / MANIFEST if src.path.is_dir() else None
    if manifest is None or not manifest.is_file():
        return {}
    lexicon = json.loads(manifest.read_text()).get("lexicon")
    return {"lexicon": lexicon} if lexicon else {}


def _write_items(
    records: Iterator[Record], builder: ItemBuilder, writer: TableWriter, total: int, shard_rows: int
) -> list[dict]:
    """Builds and writes the items shard by shard; returns the rejects."""
    rejects: list[dict] = []
    pending: list[dict] = []
    with ui.progress("ingest", total, unit="rows") as advance:
        for record in records:
            try:
                pending.append(builder.build(record))
            except Rejected as exc:  # an ImageError too
                rejects.append(_reject_row(record, builder.columns, exc))
            if len(pending) >= shard_rows:
                writer.write(pa.Table.from_pylist(pending, schema=ITEMS))
                pending.clear()
            advance(1)
    writer.write(pa.Table.from_pylist(pending, schema=ITEMS))
    return rejects


def _nothing_kept(src: Source, rejects: list[dict], rejects_path: Path) -> UserError:
    """An empty catalogue is almost always a wrong path, image folder or column mapping."""
    if not rejects:
        return UserError(f"{src.path} has no rows: nothing to ingest")
    reason, count = Counter(reject["reason"] for reject in rejects).most_common(1)[0]
    example = next(reject["detail"] for reject in rejects if reject["reason"] == reason)
    return UserError(
        f"no row of {src.path} could be used: {count:,} of {len(rejects):,} rows rejected as {reason} "
        f"(e.g. {example}); check ingest.image_dir and ingest.columns. Every reject is in {rejects_path}"
    )


def _reject_row(record: Record, columns: ColumnMap, exc: Exception) -> dict:
    item_id = clean_text(record.values.get(columns.item_id)) if record.values else None
    return {
        "source": str(record.file),
        "row": record.number,
        "item_id": item_id,
        "reason": exc.reason,
        "detail": str(exc),
    }


# --- opening a source --------------------------------------------------------------------------


def open_source(path: Path, fmt: str, settings: IngestConfig) -> Source:
    """Finds the source's files, column names and row count, or says what is wrong with it."""
    path = path.expanduser().resolve()
    if not path.exists():
        raise UserError(
            f"catalogue {path} not found: pass a Kaggle folder (styles.csv + images/), "
            "a Parquet file or folder, or a CSV / JSONL file"
        )
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "parquet":
        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        if not files:
            raise UserError(f"folder {path} has no *.parquet files: point ingest at a Parquet file or folder")
        columns, total = _parquet_shape(files)
    else:
        files = [_single_file(path, fmt)]
        columns, total = _jsonl_shape(files[0]) if fmt == "jsonl" else _csv_shape(files[0])
    folder = path if path.is_dir() else path.parent
    image_dir = settings.image_dir if settings.image_dir is not None else (KAGGLE_IMAGES if fmt == "kaggle" else "")
    return Source(path, fmt, files, columns, total, folder / image_dir)


def _single_file(path: Path, fmt: str) -> Path:
    if fmt == "kaggle":
        file = path / KAGGLE_STYLES if path.is_dir() else path
        if not file.is_file():
            raise UserError(f"{path} has no {KAGGLE_STYLES}: a kaggle source is the folder with styles.csv and images/")
        return file
    if fmt not in ("csv", "jsonl"):
        raise UserError(f"unknown ingest format '{fmt}': use auto, kaggle, parquet, csv or jsonl")
    if not path.is_file():
        raise UserError(f"{path} is a folder: a {fmt} source is one .{fmt} file (images go in ingest.image_dir)")
    return path


def detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / KAGGLE_STYLES).is_file():
            return "kaggle"
        if any(path.glob("*.parquet")):
            return "parquet"
        raise UserError(
            f"cannot tell the format of folder {path}: expected {KAGGLE_STYLES} (Kaggle layout) "
            "or *.parquet files; pass --format (or set ingest.format): kaggle, parquet, csv or jsonl"
        )
    if path.name == KAGGLE_STYLES:
        return "kaggle"
    suffix = path.suffix.lower()
    formats = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
    if suffix not in formats:
        raise UserError(
            f"cannot tell the format of {path} from its suffix '{suffix}': "
            "pass --format (or set ingest.format): kaggle, parquet, csv or jsonl"
        )
    return formats[suffix]


def _parquet_shape(files: list[Path]) -> tuple[list[str], int]:
    try:
        metas = [pq.ParquetFile(file).metadata for file in files]
        return pq.read_schema(files[0]).names, sum(meta.num_rows for meta in metas)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"cannot read Parquet source {files[0].parent}: {exc}") from None


def _csv_shape(file: Path) -> tuple[list[str], int]:
    with _open_text(file) as handle:
        header = next(csv.reader(handle), None)
    if not header:
        raise UserError(f"{file} is empty: a CSV source needs a header line naming its columns")
    return [name.strip() for name in header], max(_count_lines(file) - 1, 0)


def _jsonl_shape(file: Path) -> tuple[list[str], int]:
    """Columns are the keys of the first JSON object in the file."""
    columns: list[str] = []
    with open(file, "rb") as handle:
        for line in handle:
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                columns = list(value)
                break
    return columns, _count_lines(file)


def _open_text(file: Path):
    # utf-8-sig: spreadsheet exports often start with a byte-order mark that would otherwise
    # become part of the first column's name.
    return open(file, newline="", encoding="utf-8-sig")


def _count_lines(file: Path) -> int:
    """Lines in a file, a last line without a newline included; the progress bar's total."""
    count, last = 0, b"\n"
    with open(file, "rb") as handle:
        while chunk := handle.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


# --- column mapping ----------------------------------------------------------------------------


def resolve_columns(configured: ColumnMap | None, src: Source) -> tuple[str, ColumnMap]:
    """The configured mapping (all its columns must exist), else the first known layout that fits."""
    found = ", ".join(src.columns) or "none"
    if configured is not None:
        missing = [column for column in _mapped_columns(configured) if column not in src.columns]
        if missing:
            raise UserError(
                f"{src.files[0]} has no column {', '.join(missing)} named in ingest.columns "
                f"(columns found: {found}); fix ingest.columns.* in the config"
            )
        return "custom", configured
    for name, columns in LAYOUTS.items():
        if all(column in src.columns for column in _required_columns(columns)):
            return name, columns
    raise UserError(
        f"unknown column layout in {src.files[0]} (columns found: {found}); known layouts: "
        f"{', '.join(LAYOUTS)}. Map your columns in the config: ingest.columns.item_id, "
        "ingest.columns.title, ingest.columns.category (root to leaf), ingest.columns.image, ..."
    )


def _required_columns(columns: ColumnMap) -> list[str]:
    return [columns.item_id, columns.title, *columns.category]


def _mapped_columns(columns: ColumnMap) -> list[str]:
    """Every column the mapping names except the image, which may come from ingest.image_file."""
    optional = (columns.spu_id, columns.shop_id, columns.price, columns.created_at)
    return [*_required_columns(columns), *columns.attributes.values(), *(c for c in optional if c)]


# --- reading rows ------------------------------------------------------------------------------


def read_records(src: Source, columns: ColumnMap) -> Iterator[Record]:
    if src.format == "parquet":
        wanted = [c for c in dict.fromkeys([*_mapped_columns(columns), columns.image]) if c in src.columns]
        for file in src.files:
            yield from _parquet_records(file, wanted)
    elif src.format == "jsonl":
        yield from _jsonl_records(src.files[0])
    else:
        yield from _csv_records(src.files[0])


def file_records(file: Path, fmt: str) -> Iterator[Record]:
    """The rows of one CSV or JSONL file, numbered by line: other tables a user brings in are read alike."""
    return _jsonl_records(file) if fmt == "jsonl" else _csv_records(file)


def _parquet_records(file: Path, columns: list[str]) -> Iterator[Record]:
    """Streams a Parquet file in record batches, so memory stays bounded whatever its size."""
    try:
        batches = pq.ParquetFile(file).iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns)
        number = 0
        for batch in batches:
            for values in batch.to_pylist():
                number += 1
                yield Record(file, number, values)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"cannot read Parquet file {file}: {exc}") from None


def _csv_records(file: Path) -> Iterator[Record]:
    try:
        yield from _csv_lines(file)
    except UnicodeDecodeError as exc:
        raise UserError(f"{file} is not UTF-8 text ({exc}): re-save it as UTF-8") from None


def _csv_lines(file: Path) -> Iterator[Record]:
    """Rows of a CSV file numbered by the line they start on (a quoted field may span lines).

    The csv module is used rather than pyarrow's CSV reader because pyarrow's invalid-row
    handler gets no row number when streaming, and counts rows rather than lines.
    """
    with _open_text(file) as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader)]
        while True:
            start = reader.line_num + 1
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield Record(file, start, None, f"cannot parse CSV: {exc}")
                continue
            if len(fields) == len(header):
                yield Record(file, start, dict(zip(header, fields)))
            elif fields:  # a blank line is not a row
                yield Record(file, start, None, f"expected {len(header)} fields, got {len(fields)}")


def _jsonl_records(file: Path) -> Iterator[Record]:
    with open(file, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                values = json.loads(line)
            except ValueError as exc:  # includes bytes that are not UTF-8
                yield Record(file, number, None, f"not valid JSON: {exc}")
                continue
            if isinstance(values, dict):
                yield Record(file, number, values)
            else:
                yield Record(file, number, None, f"expected a JSON object, got {type(values).__name__}")


# --- rows to items -----------------------------------------------------------------------------


class ItemBuilder:
    """Turns one source row into an items row, or raises Rejected / ImageError saying why not."""

    def __init__(self, columns: ColumnMap, settings: IngestConfig, image_root: Path, image_column: bool):
        self.columns = columns
        self.settings = settings
        self.image_root = image_root
        self.image_column = image_column  # else image files are named by settings.image_file
        self.kept: dict[str, str] = {}  # item_id -> where it was kept from
        _check_image_file_pattern(settings.image_file)

    def build(self, record: Record) -> dict:
        if record.values is None:
            raise Rejected("malformed_line", record.error)
        values, columns = record.values, self.columns
        item_id = clean_text(values.get(columns.item_id))
        if item_id is None:
            raise Rejected("missing_id", f"column '{columns.item_id}' is empty")
        # Only kept rows claim their id, so a later good copy of a rejected row still gets in.
        if item_id in self.kept:
            raise Rejected("duplicate_id", f"item_id {item_id} already kept from {self.kept[item_id]}")
        title = clean_text(values.get(columns.title))
        if title is None:
            raise Rejected("empty_title", f"column '{columns.title}' is empty")
        category = self._category(values)
        if not category:
            raise Rejected("missing_category", f"columns {', '.join(columns.category)} are all empty")
        item = {
            "item_id": item_id,
            "spu_id": self._spu_id(values, item_id, title),
            "title": title,
            "category": category,
            "attributes": self._attributes(values),
            "shop_id": clean_text(values.get(columns.shop_id)) if columns.shop_id else None,
            "price": _price(values.get(columns.price)) if columns.price else None,
            "created_at": _timestamp(values.get(columns.created_at)) if columns.created_at else None,
            # Last: decoding the image is by far the most expensive check.
            "image": check_image(self._image_bytes(values, item_id), self.settings.max_image_pixels),
        }
        self.kept[item_id] = f"{record.file.name} row {record.number}"
        return item

    def _category(self, values: dict) -> list[str]:
        """Non-empty levels, root to leaf, from one list column or one column per level."""
        levels = []
        for column in self.columns.category:
            value = values.get(column)
            for level in value if isinstance(value, (list, tuple)) else [value]:
                if (text := clean_text(level)) is not None:
                    levels.append(text)
        return levels

    def _attributes(self, values: dict) -> dict[str, str]:
        attributes = {}
        for name, column in self.columns.attributes.items():
            for key, value in _entries(name, values.get(column)):
                if (text := clean_text(value)) is not None:
                    attributes[str(key)] = text
        return attributes

    def _spu_id(self, values: dict, item_id: str, title: str) -> str:
        if self.columns.spu_id and (spu_id := clean_text(values.get(self.columns.spu_id))) is not None:
            return spu_id
        if self.settings.spu_from_title:
            # Stable across runs and machines (unlike hash()), so SPU ids survive re-ingests.
            normalised = " ".join(title.lower().split())
            return "t" + hashlib.sha1(normalised.encode()).hexdigest()[:15]
        return item_id

    def _image_bytes(self, values: dict, item_id: str) -> bytes:
        if self.image_column:
            value = values.get(self.columns.image)
        else:
            value = self.settings.image_file.format(item_id=item_id)
        if isinstance(value, dict):  # a Hugging Face `Image` cell: {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        name = str(value).strip() if value is not None else ""
        if not name:
            raise Rejected("missing_image", f"column '{self.columns.image}' is empty")
        return self._read_image_file(name)

    def _read_image_file(self, name: str) -> bytes:
        return read_image_file(self.image_root / name)


def _check_image_file_pattern(pattern: str) -> None:
    try:
        pattern.format(item_id="x")
    except (KeyError, IndexError, ValueError) as exc:
        raise UserError(
            f"ingest.image_file '{pattern}' is not a valid pattern ({exc!r}): "
            "use {item_id} as the only placeholder, e.g. '{item_id}.jpg'"
        ) from None


def _entries(name: str, value: Any) -> list[tuple]:
    """A plain cell is one attribute; a map cell (a dict, or Arrow's list of pairs) is several."""
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, list) and all(isinstance(pair, tuple) and len(pair) == 2 for pair in value):
        return value
    return [(name, value)]


def clean_text(value: Any) -> str | None:
    """A cell as clean text; None when null, NaN or blank. Integral floats lose their '.0'."""
    if value is None:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            value = int(value)
    text = str(value).strip()
    if _INTEGRAL_FLOAT.fullmatch(text):
        text = text.split(".")[0]
    return text or None


def _price(value: Any) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        price = float(value)
    except (TypeError, ValueError):
        raise Rejected("malformed_line", f"price {value!r} is not a number") from None
    return None if math.isnan(price) else price


def _timestamp(value: Any) -> dt.datetime | None:
    """A listing time from a datetime, a date or an ISO 8601 string; naive times are UTC."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, dt.datetime):
        moment = value
    elif isinstance(value, dt.date):
        moment = dt.datetime.combine(value, dt.time())
    else:
        try:
            moment = dt.datetime.fromisoformat(str(value).strip())
        except ValueError:
            raise Rejected("malformed_line", f"created_at {value!r} is not an ISO 8601 date/time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
