"""A store version in Milvus: one collection per version behind an alias, for catalogues past one machine.

    export_version(run_dir, "v3-stage2", "milvus.db")           # Milvus Lite: a local .db folder
    export_version(run_dir, None, "http://milvus:19530")        # a Milvus cluster: the same calls
    searcher = MilvusSearcher("http://milvus:19530")
    ids, scores, answered_by = searcher.search(query_vectors, k=10, leaf="dresses")

**Layout.** A store version becomes the collection `<alias>__<version>` (sanitised to Milvus's
letters, digits and underscores; `__d<dim>` is appended for a Matryoshka prefix), with fields
`item_id` (VARCHAR primary key), `vector` (FLOAT_VECTOR: Milvus Lite has no float16 vectors, so
the store's float16 is widened to float32) and `leaf` (VARCHAR, the item's leaf category, for
filtered search; "" for an item the run's catalogue no longer lists). Vectors are L2-normalised
and searched by inner product, so scores are cosine similarities, as in the faiss index.

**Switching versions.** An export writes, indexes and loads the new collection, checks that it
answers, and only then moves the alias to it in one call (`create_alias` the first time,
`alter_alias` after), so a client searching through the alias never sees a half-written version.
The searcher resolves the alias once per call and searches that concrete collection, so one call
is answered by one version, and it says which.

**Exporting again is idempotent.** Each collection records what it was made from (a `moon.export`
collection property: store version, its creation time, checkpoint digest, dim, item count) and
whether the export finished. Exporting a version whose finished collection holds every item skips
the write; an export that was cut short, or a version that has since gained items
(`moon embed --incremental`), is completed by upserting by item id (rows already there are
rewritten, never duplicated). A collection of the same name made from other vectors (the store
version was deleted and made again) is dropped and written again, unless an alias still points at
it; a collection that no MOON export made is never touched.

Rows stream from the version's shards in batches, so memory holds one batch of vectors (plus the
catalogue's id -> leaf map). Milvus Lite runs inside the process that opens its `.db` folder and
serves one process at a time.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from moon import ui
from moon.errors import UserError
from moon.io.tables import has_table, read_table
from moon.store.versions import ITEMS, Store, StoreVersion, block
from moon.vectors import prefix, unit_rows

DEFAULT_ALIAS = "moon_items"
ID_FIELD = "item_id"
VECTOR_FIELD = "vector"
LEAF_FIELD = "leaf"
EXPORT_PROPERTY = "moon.export"  # JSON: what the collection was made from, and whether it is finished
MAX_ID_LENGTH = 512
MAX_LEAF_LENGTH = 512
BATCH_BYTES = 16 << 20  # vectors per insert call: well under gRPC's 64 MiB message limit at any width
BATCH_ROWS = (256, 10_000)
READY_TIMEOUT_S = 300.0  # how long an export waits for a loaded collection to answer its self-test
INSTALL_HINT = "pip install 'moon-embedding[milvus]' (pymilvus and milvus-lite)"


def milvus_client(uri: str):
    """A `MilvusClient` for `uri`: a path ending in `.db` opens Milvus Lite in this process; an http(s)
    URI reaches a Milvus server or cluster. pymilvus is imported here so the rest of MOON never needs it."""
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise UserError(f"exporting to or searching Milvus needs pymilvus: {INSTALL_HINT}") from None
    if uri.endswith(".db"):
        parent = Path(uri).expanduser().resolve().parent
        if not parent.is_dir():
            raise UserError(f"Milvus Lite folder {uri}: its parent folder {parent} does not exist; create it first")
        uri = str(Path(uri).expanduser().resolve())
        # Milvus Lite's in-process gRPC server logs a traceback for each call it does not implement; pymilvus
        # makes one (AllocTimestamp, while waiting for an index) and carries on without it
        logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
    try:
        return MilvusClient(uri=uri)
    except Exception as exc:  # pymilvus raises several types for a bad URI or an unreachable server
        raise UserError(f"cannot reach Milvus at {uri}: {exc}") from None


def collection_name(alias: str, version: str, dim: int, full_dim: int) -> str:
    """`<alias>__<version>`, plus `__d<dim>` for a Matryoshka prefix, in the characters Milvus allows."""
    name = f"{alias}__{version}" + ("" if dim == full_dim else f"__d{dim}")
    name = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return name if re.match(r"[A-Za-z_]", name) else f"_{name}"


# ---------------------------------------------------------------- export


def export_version(run_dir: Path, version: str | None, uri: str, alias: str = DEFAULT_ALIAS,
                   dim: int | None = None) -> dict:
    """Writes store version `version` (default: the latest) of `run_dir` into Milvus at `uri` and points
    `alias` at it. Returns what it did: collection, alias, previous (the collection the alias left),
    action (created, current, completed or replaced), count, dim, seconds."""
    started = time.perf_counter()
    store = Store(run_dir)
    stored = store.open(version) if version else store.latest()
    dim = _checked_dim(stored, dim)
    if len(stored) == 0:
        raise UserError(f"store version {stored.name} holds no items: there is nothing to export")
    client = milvus_client(uri)
    from pymilvus import MilvusException

    name = collection_name(alias, stored.name, dim, stored.dim)
    try:
        action = _write(client, name, _source(stored, dim), run_dir, stored, dim)
        previous = _point_alias(client, alias, name)
    except MilvusException as exc:  # e.g. an alias named like an existing collection
        raise UserError(f"Milvus at {uri} refused the export of {stored.name} to {name}: {exc.message}") from None
    finally:
        client.close()
    return {"uri": uri, "collection": name, "alias": alias, "previous": previous, "version": stored.name,
            "action": action, "count": len(stored), "dim": dim, "seconds": round(time.perf_counter() - started, 2)}


def _checked_dim(stored: StoreVersion, dim: int | None) -> int:
    dims = sorted({*stored.matryoshka_dims, stored.dim})
    if dim is not None and dim not in dims:
        raise UserError(f"--dim {dim} is not a dimension of store version {stored.name}: choose one of {dims}")
    return dim or stored.dim


def _source(stored: StoreVersion, dim: int) -> dict:
    """What a collection is made from; the same source means the same vectors for every id it lists."""
    return {"store_version": stored.name, "created_at": stored.manifest.get("created_at"),
            "checkpoint_digest": stored.manifest.get("checkpoint_digest"), "dim": dim}


def _write(client, name: str, source: dict, run_dir: Path, stored: StoreVersion, dim: int) -> str:
    """Makes collection `name` hold every item of `stored`, finished, indexed and loaded; says how."""
    state = _export_state(client, name)
    if state is not None and _same_source(state, source) and state.get("finished") and state["count"] == len(stored):
        client.load_collection(name)  # a no-op when loaded; a released collection must answer before the alias moves
        _wait_until_answering(client, name, stored, dim)
        return "current"
    if state is not None and _same_source(state, source):
        action, upsert = "completed", True
    else:
        action, upsert = ("replaced" if state is not None else "created"), False
        if state is not None:
            _drop_unserved(client, name)
        _create(client, name, dim, source)
    _set_state(client, name, {**source, "count": len(stored), "finished": False})
    _stream_rows(client, name, run_dir, stored, dim, upsert)
    _index_and_load(client, name)
    _wait_until_answering(client, name, stored, dim)
    _set_state(client, name, {**source, "count": len(stored), "finished": True})
    return action


def _export_state(client, name: str) -> dict | None:
    """The `moon.export` record of collection `name`; None when there is no such collection. A
    collection without one was not made by a MOON export, so it is refused rather than replaced."""
    if not client.has_collection(name):
        return None
    recorded = client.describe_collection(name).get("properties", {}).get(EXPORT_PROPERTY)
    if recorded is None:
        raise UserError(f"Milvus collection {name} exists but was not made by `moon export`: "
                        "drop or rename it, or export under another --alias")
    return json.loads(recorded)


def _same_source(state: dict, source: dict) -> bool:
    return all(state.get(key) == value for key, value in source.items())


def _drop_unserved(client, name: str) -> None:
    """Drops a collection made from other vectors, unless an alias still serves it."""
    serving = client.list_aliases(name).get("aliases", [])
    if serving:
        raise UserError(f"Milvus collection {name} holds other vectors than the store version now has, and alias "
                        f"{', '.join(serving)} still serves it: export another version first (which moves the "
                        "alias), then export this one again")
    client.drop_collection(name)


def _create(client, name: str, dim: int, source: dict) -> None:
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field(ID_FIELD, DataType.VARCHAR, is_primary=True, max_length=MAX_ID_LENGTH)
    schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field(LEAF_FIELD, DataType.VARCHAR, max_length=MAX_LEAF_LENGTH)
    client.create_collection(name, schema=schema, properties={EXPORT_PROPERTY: json.dumps(source)})


def _set_state(client, name: str, state: dict) -> None:
    client.alter_collection_properties(name, {EXPORT_PROPERTY: json.dumps(state)})


def _stream_rows(client, name: str, run_dir: Path, stored: StoreVersion, dim: int, upsert: bool) -> None:
    """Inserts (or upserts) every item of `stored`, one batch of rows at a time."""
    write = client.upsert if upsert else client.insert
    leaves = _leaf_of(run_dir)
    with ui.progress(f"exporting {stored.name} to Milvus", total=len(stored), unit="items") as advance:
        for ids, vectors in _batches(stored, dim):
            rows = [{ID_FIELD: item, VECTOR_FIELD: vector, LEAF_FIELD: leaves.get(item, "")}
                    for item, vector in zip(ids, vectors)]
            write(name, rows)
            advance(len(rows))
    client.flush(name)  # seals what was written, so the index is built over all of it


def _leaf_of(run_dir: Path) -> dict[str, str]:
    """item id -> leaf category from the run's catalogue; empty when the run has no items table."""
    if not has_table(run_dir, "items"):
        return {}
    items = read_table(run_dir, "items", ["item_id", "category"])
    paths = items["category"].to_pylist()
    # interned: a million items share a few hundred leaf strings instead of holding a copy each
    return {item: sys.intern((path[-1] if path else "")[:MAX_LEAF_LENGTH])
            for item, path in zip(items["item_id"].to_pylist(), paths)}


def _batches(stored: StoreVersion, dim: int) -> Iterator[tuple[list[str], np.ndarray]]:
    """(ids, unit float32 vectors of `dim`) from the version's item shards, about BATCH_BYTES at a time."""
    rows = int(np.clip(BATCH_BYTES // (4 * dim), *BATCH_ROWS))
    for shard in block(stored.manifest, ITEMS)["shards"]:
        with pq.ParquetFile(stored.path / shard["file"]) as file:
            for batch in file.iter_batches(batch_size=rows, columns=[ID_FIELD, VECTOR_FIELD]):
                ids = batch.column(ID_FIELD).to_pylist()
                too_long = [item for item in ids if len(item.encode()) > MAX_ID_LENGTH]
                if too_long:
                    raise UserError(f"item id {too_long[0][:60]!r}... is longer than Milvus's {MAX_ID_LENGTH}-byte "
                                    "key field allows")
                flat = batch.column(VECTOR_FIELD).flatten().to_numpy(zero_copy_only=False)
                full = flat.reshape(len(ids), stored.dim).astype(np.float32)
                yield ids, unit_rows(full[:, :dim])


def _index_and_load(client, name: str) -> None:
    """AUTOINDEX by inner product (HNSW in Milvus Lite; the server's choice on a cluster), then load."""
    if not client.list_indexes(name, field_name=VECTOR_FIELD):
        params = client.prepare_index_params()
        params.add_index(field_name=VECTOR_FIELD, index_type="AUTOINDEX", metric_type="IP")
        client.create_index(name, params)
    client.load_collection(name)


def _wait_until_answering(client, name: str, stored: StoreVersion, dim: int, timeout: float = READY_TIMEOUT_S) -> None:
    """Waits until the loaded collection counts every item and finds its first item by its own vector.

    Milvus builds indexes and makes inserted rows visible asynchronously (a cluster after a consistency
    delay, Milvus Lite after background index builds), so the alias moves only once this passes."""
    ids, vectors = next((ids, vectors) for ids, vectors in _batches(stored, dim) if ids)
    deadline = time.monotonic() + timeout
    pause = 0.05
    while True:
        if _answers(client, name, len(stored), vectors[:1]):
            return
        if time.monotonic() > deadline:
            raise UserError(f"Milvus collection {name} did not answer within {timeout:.0f}s of loading "
                            f"(expected {len(stored)} items, and item {ids[0]!r} found by its own vector); "
                            "the alias was not moved: check the server, then export again")
        time.sleep(pause)
        pause = min(pause * 2, 2.0)


def _answers(client, name: str, count: int, vector: np.ndarray) -> bool:
    counted = client.query(name, output_fields=["count(*)"], consistency_level="Strong")
    if not counted or counted[0]["count(*)"] != count:
        return False
    hits = client.search(name, data=vector, limit=1, output_fields=[ID_FIELD], consistency_level="Strong",
                         search_params={"metric_type": "IP"})
    # its own vector scores 1, less what a server-chosen index may lose to quantisation
    return bool(hits and hits[0]) and hits[0][0]["distance"] > 0.99


def _point_alias(client, alias: str, name: str) -> str | None:
    """Points `alias` at `name` in one call; returns the collection it pointed at before (None: new alias)."""
    previous = client.describe_alias(alias)["collection_name"] if _has_alias(client, alias) else None
    if previous is None:
        client.create_alias(name, alias)
    elif previous != name:
        client.alter_alias(name, alias)
    return previous


def _has_alias(client, alias: str) -> bool:
    # listed first: describing a missing alias is an error that pymilvus logs
    return alias in client.list_aliases().get("aliases", [])


# ---------------------------------------------------------------- search


class MilvusSearcher:
    """Top-k cosine search through an alias: each call is answered by the one collection the alias named
    when the call began. Safe to share between threads (the client's gRPC channel is)."""

    def __init__(self, uri: str, alias: str = DEFAULT_ALIAS):
        self.uri = uri
        self.alias = alias
        self._client = milvus_client(uri)
        self._dims: dict[str, int] = {}  # a collection's width never changes, so it is asked once
        self._loaded: set[str] = set()

    def version(self) -> str:
        """The collection the alias points at now (one `describe_alias` call)."""
        from pymilvus import MilvusException

        try:
            return self._client.describe_alias(self.alias)["collection_name"]
        except MilvusException as exc:
            raise UserError(f"Milvus at {self.uri} cannot resolve alias {self.alias!r} ({exc.message}): "
                            f"run `moon export --to milvus {self.uri}` first") from None

    def search(self, vectors: np.ndarray, k: int, leaf: str | None = None) -> tuple[list[list[str]], np.ndarray, str]:
        """(ids, scores, collection): each query's up to `k` nearest items by cosine similarity, best first,
        within leaf category `leaf` when given. `scores` is float32 (queries, k), -inf where fewer than k
        items were found (and that query's id list is shorter). The leaf filter is applied inside the graph
        search, so on an HNSW index (Milvus Lite's AUTOINDEX) a k near the number of items the leaf holds
        can come back with fewer than k."""
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise UserError(f"k={k!r} must be a positive integer")
        from pymilvus import MilvusException

        name = self.version()
        try:
            self._ensure_loaded(name)
            queries = self._queries(vectors, name)
            hits = self._client.search(name, data=queries, limit=int(k), filter=leaf_filter(leaf),
                                       output_fields=[ID_FIELD], search_params={"metric_type": "IP"})
        except MilvusException as exc:  # a server that fails a call is the caller's to report (e.g. as 503)
            raise UserError(f"Milvus at {self.uri} could not search {name}: {exc.message}") from None
        scores = np.full((len(queries), int(k)), -np.inf, dtype=np.float32)
        ids = []
        for row, found in enumerate(hits):
            ids.append([hit[ID_FIELD] for hit in found])
            scores[row, :len(found)] = [hit["distance"] for hit in found]
        return ids, scores, name

    def health(self) -> dict[str, Any]:
        """{"ok", "uri", "alias", "collection", "store_version", "count", "loaded", "error"}: whether the alias
        resolves to a loaded collection that a MOON export finished (loading it first if needed). Never raises."""
        report: dict[str, Any] = {"ok": False, "uri": self.uri, "alias": self.alias}
        try:
            name = self.version()
            self._ensure_loaded(name)
            state = json.loads(self._client.describe_collection(name)["properties"].get(EXPORT_PROPERTY, "{}"))
            loaded = str(self._client.get_load_state(name)["state"]) == "Loaded"
            report.update(collection=name, store_version=state.get("store_version"), count=state.get("count"),
                          loaded=loaded, ok=loaded and bool(state.get("finished")))
        except Exception as exc:  # a health check reports what is wrong instead of failing
            report["error"] = str(exc)
        return report

    def close(self) -> None:
        self._client.close()

    def _ensure_loaded(self, name: str) -> None:
        """Loads a collection the first time this searcher meets it, if it is not loaded: Milvus Lite forgets
        what was loaded when its process ends, so a collection exported by another process starts released."""
        if name in self._loaded:
            return
        if str(self._client.get_load_state(name)["state"]) != "Loaded":
            self._client.load_collection(name)
        self._loaded.add(name)

    def _queries(self, vectors: np.ndarray, name: str) -> list[np.ndarray]:
        if name not in self._dims:
            fields = self._client.describe_collection(name)["fields"]
            self._dims[name] = next(int(f["params"]["dim"]) for f in fields if f["name"] == VECTOR_FIELD)
        x = np.asarray(vectors, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self._dims[name]:
            raise UserError(f"queries must be a (n, {self._dims[name]}) array for collection {name}, "
                            f"got shape {x.shape}")
        try:
            return list(prefix(x))
        except ValueError as exc:
            raise UserError(f"queries: {exc}") from None


def leaf_filter(leaf: str | None) -> str:
    """A Milvus boolean expression selecting one leaf category ("" selects everything)."""
    if leaf is None:
        return ""
    quoted = leaf.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'{LEAF_FIELD} == "{quoted}"'
