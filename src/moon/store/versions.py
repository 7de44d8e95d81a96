"""The versioned representation store: one vector per catalogue item and per distinct query of
the behaviour log, for one model, in float16 shards.

Layout, inside the run directory:

    store/
      v1-stage2/                        version 1, made by the stage-2 model
        plan.json                       what the version is made from; written first
        part-00000.parquet              item partition 0 of `partitions`: (item_id, vector) rows
        ...
        part-inc-20260105T101500123456Z.parquet   items added later (`moon embed --incremental`)
        queries-part-00000.parquet      query partition 0 of `partitions`: (query_id, vector) rows
        ...
        queries-part-inc-20260105T101500123456Z.parquet   queries added later
        manifest.json                   written last; it lists the shards and their counts
      v2-stage2/

**Items and queries.** A version holds two kinds of rows (`ROW_KINDS`), each in shards of its own:
"items", keyed by `item_id`, and "queries", keyed by `moon.queries.query_id`. The manifest
lists the item shards at its top level (`count`, `shards`) and the query shards in a block
of their own, `"queries": {"count": n, "shards": [...]}`; a version without that block (one
made before queries were stored, from a run without a behaviour log, or by a model that
describes items only: its `queries_absent` says why) holds no queries. Every method that reads
or writes rows takes `of="items"` (the default) or `of="queries"`; both kinds take the same
code path, so everything below holds for both.

**Names.** A version is `v<N>-<model label>`: N is one more than the highest N in the store
(finished or not), so names sort by age and say which model made them. `latest()` is the
finished version with the highest N.

**Atomicity.** Every file appears by `os.replace` of a fully written hidden temporary file
`.<name>.tmp-<pid>`: a reader never sees half a shard, and a killed writer leaves only
temporary files, which the next writer removes. A version without `manifest.json` is still
being made and readers ignore it. A reader trusts the manifest's shard list only, so a shard
written by an add that was killed before it updated the manifest stays invisible.

**Vectors.** The full dimension, L2-normalised, stored as Arrow `fixed_size_list<halffloat>[dim]`:
Parquet keeps the values in its FLOAT16 logical type (2-byte fixed-length values; pyarrow >= 15
writes and reads it and restores the list type from the stored Arrow schema), half the bytes
of float32 at ~1e-3 relative precision. Readers get float32, re-normalised; a Matryoshka dim
is the re-normalised prefix, so one stored vector serves every dim.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moon.errors import UserError
from moon.io.atomic import atomic_json, atomic_parquet
from moon.io.tables import MANIFEST, table_path, utc_now
from moon.run import RunDir
from moon.vectors import unit_rows

PLAN = "plan.json"
DTYPE = "float16"
NAME = re.compile(r"^v(\d+)-[A-Za-z0-9_.-]+$")
# A run with the same values of these continues (or reuses) a version instead of making a new one.
PLAN_KEYS = ("checkpoint_digest", "items_digest", "events_digest", "partitions", "item_view", "bidirectional",
             "dtype")
ITEMS, QUERIES = "items", "queries"


@dataclass(frozen=True)
class RowKind:
    """One kind of row a version holds: the column of its ids and the prefix of its shards."""

    name: str
    key: str  # the id column of its shards
    prefix: str  # shards are <prefix>NNNNN.parquet, increments <prefix>inc-<time>.parquet


ROW_KINDS = {ITEMS: RowKind(ITEMS, "item_id", "part-"), QUERIES: RowKind(QUERIES, "query_id", "queries-part-")}


def row_kind(of: str) -> RowKind:
    if of not in ROW_KINDS:
        raise ValueError(f"of={of!r}: a store version holds {' or '.join(map(repr, ROW_KINDS))}")
    return ROW_KINDS[of]


def shard_name(partition: int, of: str = ITEMS) -> str:
    return f"{row_kind(of).prefix}{partition:05d}.parquet"


def partition_bounds(items: int, partitions: int, partition: int) -> tuple[int, int]:
    """Catalogue rows [start, stop) of a partition: contiguous, so a partition is one cheap read."""
    return partition * items // partitions, (partition + 1) * items // partitions


def checkpoint_digest(model_dir: Path) -> str:
    """Hash of a model directory's weight files: which weights made a version, wherever they live now."""
    files = sorted(p for p in Path(model_dir).glob("*") if p.suffix in (".safetensors", ".bin"))
    if not files:
        raise UserError(f"{model_dir} has no weight files (*.safetensors, *.bin): point --model at a model directory")
    stats = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _digest_of_files(stats)


@functools.lru_cache(maxsize=32)
def _digest_of_files(stats: tuple[tuple[str, int, int], ...]) -> str:
    """Hashed once per set of unchanged files (path, size, mtime): a run asks for the same
    weights' digest at every stage, and real checkpoints are gigabytes."""
    digest = hashlib.sha256()
    for file in (Path(path) for path, _, _ in stats):
        with file.open("rb") as handle:
            digest.update(file.name.encode() + hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()[:16]


def table_digest(run_dir: Path, name: str) -> str:
    """Which table a version is made from: the hash of its manifest (a rewritten table has a new one)."""
    return _digest((table_path(run_dir, name) / MANIFEST).read_bytes())


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def write_shard(path: Path, ids: Sequence[str], vectors: np.ndarray, of: str = ITEMS) -> int:
    """Writes L2-normalised float16 vectors to a hidden temporary file, then renames it to `path`."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(ids):
        raise ValueError(f"{len(ids)} ids need a ({len(ids)}, dim) array, got {vectors.shape}")
    vectors = unit_rows(vectors).astype(np.float16)
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), type=pa.float16()), vectors.shape[1])
    table = pa.table({row_kind(of).key: pa.array(list(ids), type=pa.string()), "vector": column})
    atomic_parquet(table, path)
    return table.num_rows


def remove_temporary(folder: Path) -> None:
    """Removes what killed writers left: hidden temporary files, never visible shards."""
    for stale in folder.glob(".*.tmp-*"):
        stale.unlink(missing_ok=True)


class Store:
    """The versions in one run directory's `store/`."""

    def __init__(self, run_dir: Path):
        self.root = RunDir(run_dir).store

    def path(self, name: str) -> Path:
        return self.root / name

    def names(self) -> list[str]:
        """Every version folder, finished or not, oldest (lowest N) first."""
        found = [p.name for p in self.root.glob("v*") if p.is_dir() and NAME.match(p.name)]
        return sorted(found, key=lambda name: (int(NAME.match(name).group(1)), name))

    def versions(self) -> list[str]:
        """Finished versions, oldest first."""
        return [name for name in self.names() if (self.path(name) / MANIFEST).exists()]

    def in_progress(self) -> list[str]:
        return [name for name in self.names() if not (self.path(name) / MANIFEST).exists()]

    def latest(self) -> StoreVersion:
        finished = self.versions()
        if not finished:
            raise UserError(f"no finished representation store version in {self.root}: run `moon embed` first")
        return self.open(finished[-1])

    def open(self, name: str) -> StoreVersion:
        if not (self.path(name) / MANIFEST).exists():
            state = "is still being made (run `moon embed` to finish it)" if self.path(name).is_dir() else "does not exist"
            raise UserError(f"store version {name} {state}; finished versions: {', '.join(self.versions()) or 'none'}")
        return StoreVersion(self.path(name))

    def made_by(self, model_path: Path) -> str | None:
        """The newest finished version made by the weights now in `model_path` (matched by
        checkpoint digest, wherever the weights lived), or None: no version of this model is current."""
        try:
            digest = checkpoint_digest(model_path)
        except UserError:  # no weights there (yet)
            return None
        made = [name for name in self.versions() if self.open(name).manifest.get("checkpoint_digest") == digest]
        return made[-1] if made else None

    def next_name(self, label: str) -> str:
        numbers = [int(NAME.match(name).group(1)) for name in self.names()]
        return f"v{max(numbers, default=0) + 1}-{re.sub(r'[^A-Za-z0-9_.-]', '-', label)}"

    def begin(self, plan: dict, name: str | None = None, new_plan: Callable[[], dict] | None = None) -> VersionBuilder:
        """The version to fill for `plan`: `name`, else the newest one made from the same plan
        (finished: it is current; unfinished: it is resumed), else a new `v<N>-<model>`.
        `new_plan()` gives what a new version's plan adds, computed only for a new version
        (e.g. the count of the log's distinct queries: a pass over the log)."""
        if name is not None and not NAME.match(name):
            raise UserError(f"store version name '{name}' must look like v<N>-<label>, e.g. v3-stage2")
        name = name or self._same_plan(plan) or self.next_name(plan["model"])
        path = self.path(name)
        if (path / PLAN).exists():
            made_from = json.loads((path / PLAN).read_text())
            if not same_plan(made_from, plan):
                raise UserError(f"store version {name} is made from another model, catalogue or log "
                                f"(checkpoint {made_from['checkpoint_digest']}): choose a new --version name")
        else:
            path.mkdir(parents=True, exist_ok=True)
            atomic_json(path / PLAN, {"version": name, **plan, **(new_plan() if new_plan else {})})
        remove_temporary(path)
        return VersionBuilder(path)

    def builder(self, name: str) -> VersionBuilder:
        return VersionBuilder(self.path(name))

    def _same_plan(self, plan: dict) -> str | None:
        for name in reversed(self.names()):
            file = self.path(name) / PLAN
            if file.exists() and same_plan(json.loads(file.read_text()), plan):
                return name
        return None


def same_plan(a: dict, b: dict) -> bool:
    return all(a.get(key) == b.get(key) for key in PLAN_KEYS)


class VersionBuilder:
    """A version being made one partition at a time; processes write disjoint partitions.

    Its plan says which kinds it holds: items always, queries when the plan has a `queries`
    block (`{"count": n}`); each kind is split into the plan's `partitions`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.name = self.path.name
        self.plan = json.loads((self.path / PLAN).read_text())

    @property
    def finished(self) -> bool:
        return (self.path / MANIFEST).exists()

    def kinds(self) -> list[str]:
        """The kinds of row this version is planned to hold."""
        return [ITEMS, QUERIES] if QUERIES in self.plan else [ITEMS]

    def count(self, of: str = ITEMS) -> int:
        """Rows of one kind the version is planned to hold (0 for a kind it does not hold)."""
        if of not in self.kinds():
            return 0
        return self.plan[ITEMS] if of == ITEMS else self.plan[QUERIES]["count"]

    def bounds(self, partition: int, of: str = ITEMS) -> tuple[int, int]:
        """Rows [start, stop) of partition `partition` of one kind."""
        return partition_bounds(self.count(of), self.plan["partitions"], partition)

    def missing(self, of: str = ITEMS) -> list[int]:
        """Partitions of one kind without a shard: a resumed run computes only these."""
        if of not in self.kinds():
            return []
        return [p for p in range(self.plan["partitions"]) if not (self.path / shard_name(p, of)).exists()]

    def write(self, partition: int, ids: Sequence[str], vectors: np.ndarray, of: str = ITEMS) -> None:
        write_shard(self.path / shard_name(partition, of), ids, vectors, of)

    def finish(self, **extra) -> StoreVersion:
        """Writes the manifest, which makes the version visible; every partition must have its shard."""
        blocks = {}
        for of in self.kinds():
            if self.missing(of):
                raise RuntimeError(f"{self.name}: {of} partitions {self.missing(of)} have no shard yet")
            shards = [{"file": shard_name(p, of), "count": pq.read_metadata(self.path / shard_name(p, of)).num_rows}
                      for p in range(self.plan["partitions"])]
            blocks[of] = {"count": sum(shard["count"] for shard in shards), "shards": shards}
        manifest = {**self.plan, "created_at": utc_now(), **extra}
        for of, block in blocks.items():
            manifest = with_block(manifest, of, block)
        atomic_json(self.path / MANIFEST, manifest)
        return StoreVersion(self.path)


def block(manifest: dict, of: str = ITEMS) -> dict:
    """The manifest's {"count", "shards"} of one kind; items' live at its top level (as in every
    version ever written), queries' in their own block; no block: the version holds none."""
    if row_kind(of).name == ITEMS:
        return {"count": manifest["count"], "shards": manifest["shards"]}
    listed = manifest.get(QUERIES)
    return listed if isinstance(listed, dict) and "shards" in listed else {"count": 0, "shards": []}


def with_block(manifest: dict, of: str, listed: dict) -> dict:
    """A copy of `manifest` that lists `listed` ({"count", "shards"}) as its rows of one kind."""
    if row_kind(of).name == ITEMS:
        return {**manifest, "count": listed["count"], "shards": listed["shards"]}
    return {**manifest, QUERIES: {"count": listed["count"], "shards": listed["shards"]}}


class StoreVersion:
    """A finished version: ids and vectors of every item (and query) it holds, read on first use."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.name = self.path.name
        self._load_manifest()

    def _load_manifest(self) -> None:
        self.manifest = json.loads((self.path / MANIFEST).read_text())
        self._tables: dict[str, pa.Table] = {}
        self._rows: dict[str, dict[str, int]] = {}

    def __len__(self) -> int:
        return self.manifest["count"]

    def count(self, of: str = ITEMS) -> int:
        """How many rows of one kind the version holds."""
        return block(self.manifest, of)["count"]

    @property
    def dim(self) -> int:
        return self.manifest["dims"]

    @property
    def matryoshka_dims(self) -> list[int]:
        return self.manifest["matryoshka_dims"]

    def table(self, of: str = ITEMS) -> pa.Table:
        """(id, float16 vector) rows of the shards the manifest lists, in its order: (item_id, vector)
        for items, (query_id, vector) for queries."""
        if of not in self._tables:
            schema = pa.schema([(row_kind(of).key, pa.string()), ("vector", pa.list_(pa.float16(), self.dim))])
            listed = block(self.manifest, of)["shards"]
            shards = [pq.read_table(self.path / shard["file"]).cast(schema) for shard in listed]
            self._tables[of] = pa.concat_tables(shards) if shards else schema.empty_table()
        return self._tables[of]

    def ids(self, of: str = ITEMS) -> list[str]:
        """The ids of every row of one kind, in the order of `vectors(of=...)`."""
        return self.table(of)[row_kind(of).key].to_pylist()

    def item_ids(self) -> list[str]:
        return self.ids(ITEMS)

    def vectors(self, dim: int | None = None, of: str = ITEMS) -> np.ndarray:
        """Every row's vector as float32 (count, dim), L2-normalised; a smaller `dim` is the
        Matryoshka prefix, re-normalised."""
        dim = self._check_dim(dim)
        flat = self.table(of)["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return unit_rows(flat.reshape(-1, self.dim)[:, :dim].astype(np.float32))

    def rows(self, ids: Sequence[str], of: str = ITEMS) -> np.ndarray:
        """Row of each id in `vectors(of=...)`, -1 where the version does not hold it."""
        if of not in self._rows:
            self._rows[of] = {key: i for i, key in enumerate(self.ids(of))}
        found = self._rows[of]
        return np.array([found.get(key, -1) for key in ids], dtype=np.int64)

    def lookup(self, ids: Sequence[str], dim: int | None = None, of: str = ITEMS) -> np.ndarray:
        """Vectors of `ids`, in their order; KeyError if the version lacks any."""
        rows = self.rows(ids, of)
        if (rows < 0).any():
            missing = [key for key, row in zip(ids, rows) if row < 0]
            noun = row_kind(of).key.replace("_", " ")
            raise KeyError(f"{len(missing)} {noun}s are not in store version {self.name}, e.g. {missing[0]!r}")
        return self.vectors(dim, of)[rows]

    def add(self, ids: Sequence[str], vectors: np.ndarray, of: str = ITEMS) -> int:
        """Adds the rows the version does not hold yet as one new shard, then rewrites the manifest
        to list it (both by rename). One writer at a time; returns how many rows were added."""
        new = self.rows(ids, of) < 0
        new &= ~_repeated(ids)
        if not new.any():
            return 0
        self._remove_unlisted()
        file = f"{row_kind(of).prefix}inc-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%fZ')}.parquet"
        count = write_shard(self.path / file, [i for i, keep in zip(ids, new) if keep], np.asarray(vectors)[new], of)
        listed = block(self.manifest, of)
        listed = {"count": listed["count"] + count, "shards": [*listed["shards"], {"file": file, "count": count}]}
        atomic_json(self.path / MANIFEST, with_block({**self.manifest, "updated_at": utc_now()}, of, listed))
        self._load_manifest()
        return count

    def _remove_unlisted(self) -> None:
        """An add killed between its shard and its manifest left a shard nobody reads: remove it."""
        listed = {shard["file"] for of in ROW_KINDS for shard in block(self.manifest, of)["shards"]}
        for kind in ROW_KINDS.values():
            for shard in self.path.glob(f"{kind.prefix}inc-*.parquet"):
                if shard.name not in listed:
                    shard.unlink(missing_ok=True)
        remove_temporary(self.path)

    def _check_dim(self, dim: int | None) -> int:
        dim = dim or self.dim
        if dim not in (*self.matryoshka_dims, self.dim):
            raise UserError(f"dim={dim} is not a dimension of store version {self.name}: "
                            f"{sorted({*self.matryoshka_dims, self.dim})}")
        return dim


def _repeated(ids: Sequence[str]) -> np.ndarray:
    """True for every repeat of an id after its first occurrence."""
    seen: set[str] = set()
    flags = []
    for key in ids:
        flags.append(key in seen)
        seen.add(key)
    return np.array(flags, dtype=bool)
