"""`moon ingest-log`: a real behaviour log -> the `events` table, plus `log_rejects.parquet`.

Formats (`--format`, or detected from the path):

- ubi: a folder with UBI 1.3 `queries.jsonl` + `events.jsonl` (`moon.sources.ubi`);
- events: MOON's own `events` columns (`schema.EVENTS`) as a Parquet file or folder, or a CSV
  whose `query_image` column holds base64 or a file path;
- taobao: the Taobao UserBehavior CSV, `user,item,category,behavior,ts` without a header (pv is
  read as a click on the item's page, fav as a cart: an intent to buy later). It has no queries
  and no impressions, so one session is a user's day and the summary says what that leaves.

Every kept event references an ingested item. A row that cannot be used becomes a reject with
its file, line and reason (LOG_REJECT_REASONS); a bad row never aborts the ingest. A log can
come in several parts: each ingest appends to the events already there, and an event already
ingested (the same source event id, or the same time, user, session, item, action and rank) is
rejected as a duplicate. One part is held in memory while it is checked: split a log larger
than memory into parts. The events manifest records that the behaviour is real.
"""

from __future__ import annotations

import base64
import binascii
import csv
import datetime as dt
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from moon import ui
from moon.config import MoonConfig
from moon.errors import Rejected, UserError
from moon.io.atomic import atomic_parquet
from moon.io.images import ImageError, check_image, pixel_limit
from moon.io.schema import ACTIONS, EVENTS, REJECTS
from moon.io.tables import TableWriter, has_table, read_manifest, read_table
from moon.run import RunDir
from moon.sources import ubi
from moon.sources.catalogue import clean_text

FORMATS = ("ubi", "events", "taobao")
LOG_REJECT_REASONS = (
    "malformed_line",
    "unknown_item",
    "bad_timestamp",
    "unknown_action",
    "missing_user",
    "click_without_impression",
    "duplicate_event",
    "corrupt_image",
    "image_too_large",
    "missing_image",
)
TAOBAO_ACTIONS = {"pv": "click", "fav": "cart", "cart": "cart", "buy": "purchase"}
TAOBAO_COLUMNS = ("user", "item", "category", "behavior", "ts")
NO_RANK = 0  # `position` of an event whose log does not say where the item was shown


@dataclass
class Candidate:
    """One event of a source, parsed but not yet checked against the catalogue and the log."""

    file: Path
    line: int
    values: dict  # ts, user, session, region, text, photo, item, position, action, event_id


@dataclass
class LogSummary:
    source: str
    format: str
    kept_by_action: dict[str, int]
    rejected_by_reason: dict[str, int]
    sessions: int
    users: int
    text_queries: int
    image_queries: int
    total_events: int  # in the log after this part
    seconds: float
    tasks: dict[str, str] = field(default_factory=dict)  # what the whole log can feed, and why not

    @property
    def kept(self) -> int:
        return sum(self.kept_by_action.values())

    def rows(self) -> list[tuple]:
        rows = [(f"kept: {action}", n) for action, n in self.kept_by_action.items()]
        rows += [(f"rejected: {reason}", n) for reason, n in self.rejected_by_reason.items() if n]
        rows += [("rejected (total)", sum(self.rejected_by_reason.values())), ("sessions", self.sessions),
                 ("users", self.users), ("text queries", self.text_queries), ("image queries", self.image_queries),
                 ("events in the log now", self.total_events)]
        rows += [(f"task: {task}", verdict) for task, verdict in self.tasks.items()]
        return [*rows, ("seconds", f"{self.seconds:.2f}")]


def ingest_log(source: Path, config: MoonConfig, run_dir: Path, fmt: str | None = None) -> LogSummary:
    """Reads a behaviour log into `run_dir/events`, appending to a real log already there."""
    started = time.perf_counter()
    source = Path(source).expanduser().resolve()
    fmt = detect_format(source) if fmt in (None, "auto") else fmt
    items = _catalogue_ids(run_dir)
    seen = _ingested_keys(run_dir)
    with pixel_limit(config.ingest.max_image_pixels):
        rows, rejects = _check(_read(READERS[fmt](source), fmt), items, seen, config)
    rows.sort(key=lambda row: (row["ts"], row["session_id"], row["position"], ACTIONS.index(row["action"])))
    total = _write(run_dir, rows, rejects, source, fmt, config)
    by_reason = Counter(reject["reason"] for reject in rejects)
    kept = Counter(row["action"] for row in rows)
    sessions = {row["session_id"]: row for row in rows}
    return LogSummary(
        source=str(source), format=fmt,
        kept_by_action={action: kept[action] for action in ACTIONS},
        rejected_by_reason={reason: by_reason[reason] for reason in LOG_REJECT_REASONS},
        sessions=len(sessions), users=len({row["user_id"] for row in rows}),
        text_queries=sum(row["query_text"] is not None for row in sessions.values()),
        image_queries=sum(row["query_image"] is not None for row in sessions.values()),
        total_events=total, seconds=round(time.perf_counter() - started, 2), tasks=possible_tasks(run_dir),
    )


def detect_format(path: Path) -> str:
    if not path.exists():
        raise UserError(f"behaviour log {path} not found: pass a UBI folder (queries.jsonl + events.jsonl), "
                        "an events Parquet file or folder, or a CSV file")
    if ubi.is_ubi(path):
        return "ubi"
    if path.is_dir():
        if any(path.glob("*.parquet")):
            return "events"
        raise UserError(f"cannot tell the format of folder {path}: expected {ubi.EVENTS_FILE} (UBI) or *.parquet "
                        "(MOON events); pass --format ubi, events or taobao")
    if path.suffix.lower() in (".parquet", ".pq"):
        return "events"
    if path.suffix.lower() == ".csv":
        with path.open(encoding="utf-8", errors="replace") as file:
            header = file.readline().strip().split(",")
        return "events" if {"ts", "item_id", "action"} <= set(header) else "taobao"
    raise UserError(f"cannot tell the format of {path}: pass --format ubi, events or taobao")


# ---------------------------------------------------------------- readers: source rows -> candidates


def read_ubi(folder: Path) -> Iterator[Candidate | tuple[Path, int, Rejected]]:
    queries, bad = _ubi_queries(folder)
    yield from bad
    path = folder / ubi.EVENTS_FILE
    parsed = []
    for number, event, error in ubi.json_lines(path):
        if error:
            yield path, number, Rejected("malformed_line", error)
            continue
        parsed.append((number, ubi.event_fields(event)))
    explicit = {fields["query_id"] for _, fields in parsed if fields["action"] == "impression"}
    for query in queries.values():  # a query without impression events: its hit ids were shown
        if query["query_id"] not in explicit:
            for rank, item in enumerate(query["hits"], start=1):
                values = _joined({"action": "impression", "item": item, "position": rank, "ts": query["ts"]}, query)
                yield Candidate(folder / ubi.QUERIES_FILE, query["line"], values)
    for number, fields in parsed:
        query = queries.get(str(fields["query_id"])) if fields["query_id"] is not None else None
        if fields["query_id"] is not None and query is None:
            yield path, number, Rejected("malformed_line", f"query_id {fields['query_id']} is not in queries.jsonl")
            continue
        yield Candidate(path, number, _joined(fields, query))


def _ubi_queries(folder: Path) -> tuple[dict[str, dict], list]:
    path = folder / ubi.QUERIES_FILE
    queries, bad = {}, []
    if not path.is_file():
        return queries, bad  # events without queries: a browsing log
    for number, query, error in ubi.json_lines(path):
        try:
            if error:
                raise Rejected("malformed_line", error)
            fields = ubi.query_fields(query, folder)
        except Rejected as exc:
            bad.append((path, number, exc))
            continue
        queries[fields["query_id"]] = {**fields, "line": number}
    return queries, bad


def _joined(fields: dict, query: dict | None) -> dict:
    """An event's values, the query's where the event does not say."""
    query = query or {}
    return {
        "event_id": fields.get("event_id"),
        "ts": fields.get("ts") or query.get("ts"),
        "user": fields.get("user") or query.get("user"),
        "session": query.get("query_id") or fields.get("session"),
        "region": query.get("region") or fields.get("region"),
        "text": query.get("text"),
        "photo": query.get("photo"),
        "item": fields.get("item"),
        "position": fields.get("position"),
        "action": ubi.ACTIONS.get(str(fields.get("action")), fields.get("action")),
    }


def read_events(path: Path) -> Iterator[Candidate | tuple[Path, int, Rejected]]:
    """MOON's own events columns, as Parquet (photos as bytes) or CSV (photos as base64 or paths)."""
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8", errors="replace") as file:
            for number, row in enumerate(csv.DictReader(file), start=2):
                try:
                    photo = _csv_photo(row.get("query_image"), path.parent)
                except Rejected as exc:
                    yield path, number, exc
                    continue
                yield Candidate(path, number, _moon_values(row, photo))
        return
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    for file in files:
        number = 0
        for batch in pq.ParquetFile(file).iter_batches(batch_size=8192):
            for row in batch.to_pylist():
                number += 1
                yield Candidate(file, number, _moon_values(row, row.get("query_image")))


def _moon_values(row: dict, photo: bytes | None) -> dict:
    return {"event_id": row.get("event_id"), "ts": row.get("ts"), "user": row.get("user_id"),
            "session": row.get("session_id"), "region": row.get("region"), "text": clean_text(row.get("query_text")),
            "photo": photo, "item": row.get("item_id"), "position": row.get("position"), "action": row.get("action")}


def _csv_photo(cell: str | None, folder: Path) -> bytes | None:
    if not cell:
        return None
    path = folder / cell
    if len(cell) < 1024 and path.suffix and path.is_file():
        return path.read_bytes()
    try:
        return base64.b64decode(cell, validate=True)
    except (binascii.Error, ValueError):
        raise Rejected("missing_image", f"query_image is neither a file under {folder} nor base64") from None


def read_taobao(path: Path) -> Iterator[Candidate | tuple[Path, int, Rejected]]:
    with path.open(newline="", encoding="utf-8", errors="replace") as file:
        for number, row in enumerate(csv.reader(file), start=1):
            if number == 1 and row and row[0].strip().lower() in ("user", "user_id"):
                continue  # a header line
            if len(row) != len(TAOBAO_COLUMNS):
                yield path, number, Rejected("malformed_line", f"{len(row)} fields, expected {len(TAOBAO_COLUMNS)}: "
                                                               f"{','.join(TAOBAO_COLUMNS)}")
                continue
            user, item, _, behaviour, ts = (cell.strip() for cell in row)
            day = _day_of(ts)
            values = {"event_id": None, "ts": ts, "user": user, "session": f"{user}-{day}" if day else None,
                      "region": None, "text": None, "photo": None, "item": item, "position": None,
                      "action": TAOBAO_ACTIONS.get(behaviour, behaviour)}
            yield Candidate(path, number, values)


def _day_of(ts: str) -> str | None:
    try:
        return dt.datetime.fromtimestamp(int(ts), dt.UTC).strftime("%Y%m%d")
    except (ValueError, OverflowError, OSError):
        return None


READERS = {"ubi": read_ubi, "events": read_events, "taobao": read_taobao}


def _read(candidates: Iterator, fmt: str) -> list:
    with ui.progress(f"read {fmt} log", None, unit="rows") as advance:
        read = []
        for candidate in candidates:
            read.append(candidate)
            advance(1)
    return read


# ---------------------------------------------------------------- checks: candidates -> events and rejects


def _check(candidates: list, items: set[str], seen: set, config: MoonConfig) -> tuple[list[dict], list[dict]]:
    rows, rejects = [], []
    parsed: list[tuple[Candidate, dict]] = []
    for candidate in candidates:
        if isinstance(candidate, tuple):
            rejects.append(_reject(*candidate, None))
            continue
        try:
            parsed.append((candidate, _event(candidate.values, items, config)))
        except Rejected as exc:  # an ImageError too
            rejects.append(_reject(candidate.file, candidate.line, exc, candidate.values.get("item")))
    shown = {(key[2], key[3]) for key in seen if key[4] == "impression"}
    shown |= {(row["session_id"], row["item_id"]) for _, row in parsed if row["action"] == "impression"}
    showing = {session for session, _ in shown}
    ids, keys = set(), set(seen)
    for candidate, row in parsed:
        try:
            _check_in_log(row, shown, showing, ids, keys)
        except Rejected as exc:
            rejects.append(_reject(candidate.file, candidate.line, exc, row["item_id"]))
            continue
        rows.append(row)
    return rows, rejects


def _event(values: dict, items: set[str], config: MoonConfig) -> dict:
    """One event row of `schema.EVENTS`, or the reason it cannot be one."""
    item = clean_text(values.get("item"))
    if item is None or item not in items:
        raise Rejected("unknown_item", f"item {item!r} is not in the ingested catalogue")
    action = values.get("action")
    if action not in ACTIONS:
        raise Rejected("unknown_action", f"action {action!r} is not one of {', '.join(ACTIONS)} "
                                         "(UBI: impression, click, add_to_cart, purchase)")
    user = clean_text(values.get("user"))
    if user is None:
        raise Rejected("missing_user", "the event names no user (user_id or client_id)")
    photo = values.get("photo")
    if photo is not None:
        photo = _checked_photo(photo, config)
    return {
        "event_id": values.get("event_id"),
        "ts": parse_timestamp(values.get("ts")),
        "user_id": user,
        "session_id": clean_text(values.get("session")) or user,
        "region": clean_text(values.get("region")) or ubi.UNKNOWN_REGION,
        "query_text": None if photo is not None else values.get("text"),
        "query_image": photo,
        "item_id": item,
        "position": _rank(values.get("position")),
        "action": action,
    }


def _checked_photo(photo: bytes, config: MoonConfig) -> bytes:
    if len(photo) > config.ingest.max_query_image_bytes:
        raise ImageError("image_too_large", f"query photo of {len(photo):,} bytes, over "
                                            f"ingest.max_query_image_bytes={config.ingest.max_query_image_bytes:,}")
    return check_image(photo, config.ingest.max_image_pixels)


def _check_in_log(row: dict, shown: set, showing: set, ids: set, keys: set) -> None:
    """Rejects an action on an item its session did not show (where the session says what it showed:
    it has impressions), and an event already in the log or this part."""
    unshown = (row["session_id"], row["item_id"]) not in shown
    if row["action"] != "impression" and row["session_id"] in showing and unshown:
        raise Rejected("click_without_impression",
                       f"{row['action']} on item {row['item_id']} that session {row['session_id']} did not show")
    source_id = row.pop("event_id")
    if source_id is not None:
        if source_id in ids:
            raise Rejected("duplicate_event", f"event id {source_id} appears twice")
        ids.add(source_id)
    key = event_key(row)
    if key in keys:
        raise Rejected("duplicate_event", "the same event (time, user, session, item, action, rank) is already "
                                          "in the log")
    keys.add(key)


def event_key(row: dict) -> tuple:
    return (int(row["ts"].timestamp() * 1000), row["user_id"], row["session_id"], row["item_id"], row["action"],
            row["position"])


def parse_timestamp(value) -> dt.datetime:
    """ISO 8601 (without an offset: UTC), or epoch seconds or milliseconds, as an aware UTC time."""
    if isinstance(value, dt.datetime):
        return _to_ms(value if value.tzinfo else value.replace(tzinfo=dt.UTC))
    try:
        if isinstance(value, int | float) or (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
            number = float(value)
            return _to_ms(dt.datetime.fromtimestamp(number / 1000 if abs(number) > 1e11 else number, dt.UTC))
        parsed = dt.datetime.fromisoformat(str(value).strip())
    except (ValueError, OverflowError, OSError, TypeError):
        raise Rejected("bad_timestamp", f"timestamp {value!r} is neither ISO 8601 nor epoch seconds") from None
    return _to_ms(parsed.astimezone(dt.UTC) if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC))


def _to_ms(value: dt.datetime) -> dt.datetime:
    """The log keeps milliseconds (`schema.TIMESTAMP`)."""
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def _rank(value) -> int:
    if value is None or value == "":
        return NO_RANK
    try:
        rank = int(value)
    except (TypeError, ValueError):
        raise Rejected("malformed_line", f"position {value!r} is not an integer rank") from None
    if not 0 <= rank <= np.iinfo(np.int16).max:
        raise Rejected("malformed_line", f"position {rank} is out of range")
    return rank


def _reject(file: Path, line: int, exc: Exception, item) -> dict:
    return {"source": str(file), "row": line, "item_id": clean_text(item), "reason": exc.reason, "detail": str(exc)}


# ---------------------------------------------------------------- the run's tables


def _catalogue_ids(run_dir: Path) -> set[str]:
    if not has_table(run_dir, "items"):
        raise UserError(f"{run_dir} has no catalogue: every event must reference an ingested item, so run "
                        f"`moon ingest CATALOGUE --run-dir {run_dir}` first")
    return set(read_table(run_dir, "items", ["item_id"])["item_id"].to_pylist())


def _ingested_keys(run_dir: Path) -> set:
    """Keys of the events a real log already holds; a simulated log is never mixed with real events."""
    if not has_table(run_dir, "events"):
        return set()
    if read_manifest(run_dir, "events").get("simulated") is not False:
        raise UserError(f"{run_dir} holds a simulated behaviour log: ingest a real log into a run directory of its "
                        "own (`moon ingest CATALOGUE --run-dir DIR`, then `moon ingest-log LOG --run-dir DIR`)")
    table = read_table(run_dir, "events", ["ts", "user_id", "session_id", "item_id", "action", "position"])
    return {event_key(row) for row in table.to_pylist()}


def _write(run_dir: Path, rows: list[dict], rejects: list[dict], source: Path, fmt: str, config: MoonConfig) -> int:
    """Appends the part to the events (earlier parts' shards carried over) and its rejects to the log's
    rejects; rejects first, so whoever sees the new events also sees their rejects."""
    run = RunDir(run_dir)
    before = read_manifest(run_dir, "events") if has_table(run_dir, "events") else {}
    old_rejects = pq.read_table(run.log_rejects) if run.log_rejects.exists() else REJECTS.empty_table()
    new_rejects = pa.Table.from_pylist(rejects, schema=REJECTS)
    if not rows:  # the log stays as it was (its digest too): only the rejects say this part was read
        atomic_parquet(pa.concat_tables([old_rejects, new_rejects]), run.log_rejects)
        if not before:
            raise _nothing_kept(source, rejects, run.log_rejects)
        return before["rows"]
    with TableWriter(run_dir, "events", EVENTS) as writer:
        writer.carry(run_dir, "events")
        for start in range(0, len(rows), config.ingest.shard_rows):
            writer.write(pa.Table.from_pylist(rows[start:start + config.ingest.shard_rows], schema=EVENTS))
        atomic_parquet(pa.concat_tables([old_rejects, new_rejects]), run.log_rejects)
        first, last = _period(rows, before)
        parts = [*before.get("parts", []), {"source": str(source), "format": fmt, "kept": len(rows),
                                            "rejected": len(rejects)}]
        writer.commit(stage="ingest-log", simulated=False, behaviour="real", source=str(source), format=fmt,
                      parts=parts, period_start=first.isoformat(), days=(last - first).days + 1,
                      config_digest=config.digest("ingest"))
    return writer.rows


def _period(rows: list[dict], before: dict) -> tuple[dt.date, dt.date]:
    """The first and last UTC day of the whole log: this part's rows (in time order) and the period
    the earlier parts' manifest records."""
    first, last = rows[0]["ts"].date(), rows[-1]["ts"].date()
    if before:
        start = dt.date.fromisoformat(before["period_start"])
        first, last = min(first, start), max(last, start + dt.timedelta(days=before["days"] - 1))
    return first, last


def _nothing_kept(source: Path, rejects: list[dict], path: Path) -> UserError:
    if not rejects:
        return UserError(f"{source} has no events: nothing to ingest")
    reason, count = Counter(reject["reason"] for reject in rejects).most_common(1)[0]
    example = next(reject["detail"] for reject in rejects if reject["reason"] == reason)
    return UserError(f"no event of {source} could be used: {count:,} of {len(rejects):,} rejected as {reason} "
                     f"(e.g. {example}); is it the log of this run's catalogue? Every reject is in {path}")


def has_real_log(run_dir: Path) -> bool:
    """The run's behaviour was ingested (`moon ingest-log`), not simulated."""
    return has_table(run_dir, "events") and read_manifest(run_dir, "events").get("simulated") is False


def possible_tasks(run_dir: Path) -> dict[str, str]:
    """What the run's log can feed, and why not where it cannot: said after every ingest."""
    events = read_table(run_dir, "events", ["session_id", "query_text", "query_image", "action"])
    acted = events.filter(pc.not_equal(events["action"], "impression"))
    texts = pc.sum(pc.is_valid(acted["query_text"])).as_py() or 0
    photos = pc.sum(pc.is_valid(acted["query_image"])).as_py() or 0
    impressions = events.num_rows - acted.num_rows
    per_session = acted.group_by("session_id").aggregate([("action", "count")])
    sessions_with_two = pc.sum(pc.greater_equal(per_session["action_count"], 2)).as_py() or 0
    purchases = pc.sum(pc.equal(acted["action"], "purchase")).as_py() or 0

    def verdict(count: int, unit: str, why_not: str) -> str:
        return f"yes ({count:,} {unit})" if count else f"no: {why_not}"

    return {
        "text search pairs (text -> item)": verdict(texts, "acted rows with a text query", "no text queries"),
        "image search pairs (photo -> item)": verdict(photos, "acted rows with a photo", "no query photos"),
        "item -> item pairs": verdict(sessions_with_two, "sessions with two or more acted items",
                                      "no session acts on two items"),
        "stage 2 (purchases)": verdict(purchases, "purchases", "no purchases"),
        "CTR (impressions)": verdict(impressions, "impressions", "the log shows no impressions, so there are no "
                                                               "unclicked examples"),
    }
