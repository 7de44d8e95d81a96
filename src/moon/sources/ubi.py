"""UBI 1.3 (User Behavior Insights) behaviour logs: reading one into MOON's events, writing one out.

A UBI log is two JSON-lines files: `queries.jsonl` (one search each: `query_id`, `user_query`,
`client_id`/`user_id`, `timestamp`, `query_response_hit_ids` = the results shown, in rank
order) and `events.jsonl` (one action each: `action_name`, `timestamp`, `query_id`,
`event_attributes.object.object_id`, an optional `event_attributes.position`). Both the
specification's field names and the OpenSearch plugin's stored variants are read: position
as `{"ordinal": {"index": n}}` or `{"ordinal": n}`; hit ids as `query_response_hit_ids` or
`query_response_object_ids`; the item as `object.object_id` (string or integer).

Mapping onto MOON's events (one search session = one query, `schema.EVENTS`):

- session = the UBI `query_id` (an event without one: its UBI `session_id`, else the user's day);
- user = `user_id`, else `client_id`; region = `query_attributes.region` (else "unknown");
- the query photo = `query_attributes.query_image` (base64) or `query_image_ref` (a file path,
  relative to the log's folder); a photo query has an empty `user_query`;
- actions: impression, click, add_to_cart (or cart), purchase; anything else is rejected;
- impressions: a query's explicit `impression` events where it has some, else its hit ids
  (rank i+1, at the query's time). Either way the query promises what was shown, so a click
  on an item it did not show is rejected.

`write_ubi` writes a run's events the same way, every impression as an explicit event and
its rank as a 1-based ordinal, so a log read back gives the same events.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from moon.errors import Rejected, UserError
from moon.io.atomic import atomic_dir
from moon.io.tables import dataset, read_batches

QUERIES_FILE = "queries.jsonl"
EVENTS_FILE = "events.jsonl"
ACTIONS = {"impression": "impression", "click": "click", "add_to_cart": "cart", "cart": "cart",
           "purchase": "purchase"}
NAMES = {"impression": "impression", "click": "click", "cart": "add_to_cart", "purchase": "purchase"}
UNKNOWN_REGION = "unknown"


def is_ubi(path: Path) -> bool:
    return path.is_dir() and (path / EVENTS_FILE).is_file()


def json_lines(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, object or None, why not): blank lines are skipped, a bad line is reported."""
    with path.open(encoding="utf-8", errors="replace") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, None, f"not JSON: {exc}"
                continue
            yield (number, value, None) if isinstance(value, dict) else (number, None, "a line must be a JSON object")


# ---------------------------------------------------------------- reading


def query_fields(query: dict, folder: Path) -> dict:
    """A UBI query as the fields its events share: text, photo (bytes, unchecked), user, region,
    time and the ids of the results shown in rank order."""
    if not query.get("query_id"):
        raise Rejected("malformed_line", "a UBI query needs a query_id")
    attributes = query.get("query_attributes") or {}
    hits = query.get("query_response_hit_ids") or query.get("query_response_object_ids") or []
    return {
        "query_id": str(query["query_id"]),
        "text": (query.get("user_query") or "").strip() or None,
        "photo": _photo(attributes, folder),
        "user": query.get("user_id") or query.get("client_id"),
        "region": attributes.get("region") or UNKNOWN_REGION,
        "ts": query.get("timestamp"),
        "hits": [str(hit) for hit in hits],
    }


def _photo(attributes: dict, folder: Path) -> bytes | None:
    if attributes.get("query_image"):
        try:
            return base64.b64decode(attributes["query_image"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise Rejected("corrupt_image", f"query_image is not base64: {exc}") from None
    if attributes.get("query_image_ref"):
        path = folder / attributes["query_image_ref"]
        if not path.is_file():
            raise Rejected("missing_image", f"query_image_ref {path} is not a file")
        return path.read_bytes()
    return None


def event_fields(event: dict) -> dict:
    """A UBI event's own fields (its query's fields are joined by the caller)."""
    attributes = event.get("event_attributes") or {}
    target = attributes.get("object") or {}
    return {
        "event_id": event.get("event_id"),
        "query_id": event.get("query_id"),
        "session": event.get("session_id"),
        "user": event.get("user_id") or event.get("client_id"),
        "action": event.get("action_name"),
        "ts": event.get("timestamp"),
        "item": target.get("object_id"),
        "position": _ordinal(attributes.get("position")),
        "region": attributes.get("region"),
    }


def _ordinal(position: Any) -> Any:
    """The rank from `{"ordinal": {"index": n}}` (specification) or `{"ordinal": n}` (OpenSearch plugin)."""
    if not isinstance(position, dict):
        return None
    ordinal = position.get("ordinal")
    return ordinal.get("index") if isinstance(ordinal, dict) else ordinal


# ---------------------------------------------------------------- writing


def export_log(run_dir: Path, out: Path) -> dict[str, int]:
    """A run's events as UBI in `out`; a folder there that is not an earlier export is never replaced."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and {path.name for path in out.iterdir()} != {QUERIES_FILE, EVENTS_FILE}:
        raise UserError(f"{out} exists and is not a UBI export: pass --out with a new folder")
    return write_ubi(dataset(run_dir, "events"), out)


def write_ubi(events, out: Path, batch_rows: int = 65_536) -> dict[str, int]:
    """Writes a run's events (a dataset of `schema.EVENTS`) as `queries.jsonl` + `events.jsonl` in
    `out`, which appears whole or not at all; returns the lines written."""
    counts = {"queries": 0, "events": 0}
    with atomic_dir(out) as tmp, (tmp / QUERIES_FILE).open("w") as queries, (tmp / EVENTS_FILE).open("w") as lines:
        sessions: dict[str, dict] = {}
        for table in read_batches(events, None, batch_rows):
            millis = table["ts"].cast(pa.int64()).to_numpy()
            for row, ms in zip(table.to_pylist(), millis):
                query = sessions.setdefault(row["session_id"], _new_query(row, int(ms)))
                if row["action"] == "impression":
                    query["hits"].append((row["position"], row["item_id"]))
                lines.write(json.dumps(_event_line(row, int(ms))) + "\n")
                counts["events"] += 1
        for query in sessions.values():
            queries.write(json.dumps(_query_line(query)) + "\n")
            counts["queries"] += 1
    return counts


def _new_query(row: dict, ms: int) -> dict:
    return {"query_id": row["session_id"], "text": row["query_text"], "photo": row["query_image"],
            "user": row["user_id"], "region": row["region"], "ms": ms, "hits": []}


def _query_line(query: dict) -> dict:
    attributes = {"region": query["region"]}
    if query["photo"] is not None:
        attributes["query_image"] = base64.b64encode(query["photo"]).decode("ascii")
    return {"query_id": query["query_id"], "user_query": query["text"] or "", "client_id": query["user"],
            "user_id": query["user"], "timestamp": iso_ms(query["ms"]), "object_id_field": "item_id",
            "query_response_hit_ids": [item for _, item in sorted(query["hits"])], "query_attributes": attributes}


def _event_line(row: dict, ms: int) -> dict:
    attributes = {"object": {"object_id": row["item_id"], "object_id_field": "item_id"}, "region": row["region"]}
    if row["position"]:
        attributes["position"] = {"ordinal": {"index": int(row["position"])}}
    return {"action_name": NAMES[row["action"]], "timestamp": iso_ms(ms), "query_id": row["session_id"],
            "session_id": row["session_id"], "client_id": row["user_id"], "user_id": row["user_id"],
            "event_attributes": attributes}


def iso_ms(ms: int) -> str:
    return np.datetime_as_string(np.datetime64(ms, "ms"), unit="ms") + "Z"

