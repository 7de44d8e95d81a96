"""A search query's identity: one id per distinct text or photo, the key of its representation.

The behaviour log repeats a session's query on every event of the session (impressions,
clicks, ...). Representations of queries are stored once per distinct query, keyed by a
`query_id` that every stage computes the same way from the query itself:

- a text query: `t` + 15 hex digits of the SHA-1 of its text, lower-cased with runs of
  white space made one space (so "Red  Dress" and "red dress" are one query);
- a photo query: `p` + 15 hex digits of the SHA-1 of the photo's bytes.

Ids are stable across runs and machines (unlike `hash()`), so a query embedded into one
store version is found again by a CTR model built from another run over the same log.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from moon.io.tables import dataset

TEXT, PHOTO = "text", "photo"
DISTINCT_QUERIES = pa.schema([("query_id", pa.string()), ("query_text", pa.string()), ("query_image", pa.binary())])
SCAN_ROWS = 65_536


def normalise_text(text: str) -> str:
    return " ".join(text.lower().split())


def query_id(text: str | None, photo: bytes | None) -> str:
    """The id of a query that is a text or a photo (a photo wins if both are given)."""
    if photo is not None:
        return "p" + hashlib.sha1(photo).hexdigest()[:15]
    if text is None:
        raise ValueError("a query needs a text or a photo")
    return "t" + hashlib.sha1(normalise_text(text).encode()).hexdigest()[:15]


def query_ids(texts: pa.Array | pa.ChunkedArray, photos: pa.Array | pa.ChunkedArray) -> pa.Array:
    """`query_id` of each row of two aligned columns (a row with neither gets null).

    Each distinct text and photo is hashed once: a session repeats its query on every event.
    """
    by_text = _hashed(texts, lambda text: query_id(text, None))
    by_photo = _hashed(photos, lambda photo: query_id(None, photo))
    return pc.if_else(pc.is_valid(photos), by_photo, by_text)


def _hashed(values: pa.Array | pa.ChunkedArray, hash_one) -> pa.Array:
    distinct = pc.unique(values).drop_null()
    ids = pa.array([hash_one(value) for value in distinct.to_pylist()], pa.string())
    return ids.take(pc.index_in(values, value_set=distinct))


def distinct_queries(run_dir: Path, batch_rows: int = SCAN_ROWS) -> Iterator[pa.Table]:
    """The log's distinct queries as batches of (query_id, query_text, query_image), each query
    once, in order of first appearance. The log is streamed; only the ids seen are kept."""
    seen: set[str] = set()
    columns = ["query_text", "query_image"]
    # A query is searched before anything happens to its results: its impressions name every query.
    shown = pc.field("action") == "impression"
    for batch in dataset(run_dir, "events").to_batches(columns=columns, filter=shown, batch_size=batch_rows):
        ids = query_ids(batch["query_text"], batch["query_image"])
        keep = []
        for row, key in enumerate(ids.to_pylist()):
            if key is not None and key not in seen:
                seen.add(key)
                keep.append(row)
        if keep:
            rows = pa.Table.from_batches([batch]).take(keep)
            yield pa.table([ids.take(keep), rows["query_text"], rows["query_image"]], schema=DISTINCT_QUERIES)


def kind(query: str) -> str:
    """TEXT or PHOTO, from a query id."""
    return PHOTO if query.startswith("p") else TEXT
