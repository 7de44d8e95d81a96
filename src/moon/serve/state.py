"""What one store version looks like to the service: an immutable state object, swapped whole.

A `ServingState` holds everything a request reads: the version's stored vectors (for lookups),
one `Searchable` per dimension (a base index beside a delta index), and the category path of
every item (for filtered search). Nothing in it changes after it is made. A request reads the
service's current state once and uses only that object, so it is answered wholly by one
version; a reload builds a new state beside the old one and replaces the reference in one
assignment (read-copy-update); the old state is freed when its last request lets go of it.

**Base and delta.** The base is the version's saved index (`moon index`, memory-mapped
read-only, so a load takes no time and no memory of its own), or, where none was saved for
that dimension, an exact index built in memory from the stored vectors. The delta is a small
in-RAM `IndexIDMap2` over an `IndexFlatIP` holding every item the base lacks: items that
`moon embed --incremental` (or the service itself) added to the version after its index was
saved, and items added through the service since the state was loaded. A search asks both and
merges their top k; where an id is in both, the delta's vector is the one that counts. Adding
items never touches a live index: it makes a new delta (copy-on-write) and a new state.

Stored vectors are the store's float16, and items added through the service are kept in that
same float16 form, so they score the same before and after a restart.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import faiss
import numpy as np

from moon.errors import UserError
from moon.store.index import VectorIndex
from moon.store.indexing import built_from, load_index
from moon.store.versions import ITEMS, StoreVersion
from moon.vectors import checked_dim, prefix

CategoryPath = tuple[str, ...]  # an item's category path, root -> leaf


@dataclass(frozen=True)
class Hit:
    item_id: str
    score: float


# ---------------------------------------------------------------- stored vectors


class Rows:
    """Item ids and their stored float16 vectors (full dimension); read-only once made."""

    def __init__(self, ids: Sequence[str], vectors: np.ndarray):
        self.ids = list(ids)
        self.vectors = np.asarray(vectors, dtype=np.float16)
        self.vectors.flags.writeable = False
        self.row = {item_id: i for i, item_id in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.row

    def plus(self, ids: Sequence[str], vectors: np.ndarray) -> Rows:
        return Rows([*self.ids, *ids], np.concatenate([self.vectors, np.asarray(vectors, dtype=np.float16)]))

    def at(self, dim: int, rows: np.ndarray | None = None) -> np.ndarray:
        """float32 (n, dim) unit rows: the Matryoshka prefix of `rows` (default: all), as the store reads it."""
        picked = self.vectors if rows is None else self.vectors[rows]
        if len(picked) == 0:
            return np.zeros((0, dim), dtype=np.float32)
        return prefix(picked.astype(np.float32), dim)


def stored_rows(stored: StoreVersion) -> Rows:
    """The version's items as the store holds them (float16, as written)."""
    table = stored.table(ITEMS)
    flat = table["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return Rows(table["item_id"].to_pylist(), flat.reshape(-1, stored.dim))


# ---------------------------------------------------------------- categories


def members(ids: Iterable[str], paths: Mapping[str, CategoryPath]) -> dict[str, np.ndarray]:
    """category (at any level of an item's path) -> positions of its items in `ids`."""
    found: dict[str, list[int]] = {}
    for position, item_id in enumerate(ids):
        for category in set(paths.get(item_id, ())):
            found.setdefault(category, []).append(position)
    return {category: np.asarray(positions, dtype=np.int64) for category, positions in found.items()}


def selector_params(index: faiss.Index, positions: np.ndarray, params: dict) -> tuple[object, object]:
    """faiss search parameters that allow only `positions` (and the selector, which must outlive the
    search); each index kind takes its own parameter type and keeps its search-time settings."""
    selector = faiss.IDSelectorBatch(positions)
    if isinstance(index, faiss.IndexHNSW):
        search = faiss.SearchParametersHNSW()
        search.efSearch = params.get("ef_search", index.hnsw.efSearch)
    elif isinstance(index, faiss.IndexIVF):
        search = faiss.SearchParametersIVF()
        search.nprobe = params.get("nprobe", index.nprobe)
    else:
        search = faiss.SearchParameters()
    search.sel = selector
    return search, selector


def top(index: faiss.Index, labels: np.ndarray, queries: np.ndarray, k: int, allowed: np.ndarray | None,
        params: dict) -> list[list[Hit]]:
    """Each query's best `k` of `index` (positions named by `labels`), within `allowed` positions if given."""
    size = index.ntotal if allowed is None else len(allowed)
    k = min(k, size)
    if k == 0:
        return [[] for _ in queries]
    if allowed is None:
        scores, positions = index.search(queries, k)
    else:
        search, _selector = selector_params(index, allowed, params)
        scores, positions = index.search(queries, k, params=search)
    return [[Hit(str(labels[p]), float(s)) for p, s in zip(row_p, row_s) if p >= 0]
            for row_p, row_s in zip(positions, scores)]


# ---------------------------------------------------------------- delta


class Delta:
    """Items searched beside the base index at one dimension, in RAM: an `IndexIDMap2` over an
    `IndexFlatIP`, labelled by position. Immutable: `plus` makes a new one (copy-on-write)."""

    def __init__(self, dim: int, ids: Sequence[str] = (), vectors: np.ndarray | None = None,
                 paths: Mapping[str, CategoryPath] = MappingProxyType({})):
        self.dim = dim
        self.ids = np.asarray(list(ids), dtype=object)
        self.vectors = np.zeros((0, dim), dtype=np.float32) if vectors is None else np.ascontiguousarray(vectors)
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        if len(self.ids):
            self.index.add_with_ids(self.vectors, np.arange(len(self.ids), dtype=np.int64))
        self.row = {item_id: i for i, item_id in enumerate(self.ids)}
        self.members = members(self.ids, paths)

    def __len__(self) -> int:
        return len(self.ids)

    def plus(self, ids: Sequence[str], vectors: np.ndarray, paths: Mapping[str, CategoryPath]) -> Delta:
        """A new delta with these items too; an id already here takes its new vector."""
        replaced = set(ids)
        keep = np.array([item_id not in replaced for item_id in self.ids], dtype=bool)
        return Delta(self.dim, [*self.ids[keep], *ids], np.concatenate([self.vectors[keep], vectors]), paths)

    def search(self, queries: np.ndarray, k: int, category: str | None) -> list[list[Hit]]:
        allowed = None if category is None else self.members.get(category, np.zeros(0, dtype=np.int64))
        return top(self.index, self.ids, queries, k, allowed, {})


# ---------------------------------------------------------------- one dimension


@dataclass(frozen=True)
class Searchable:
    """The items searchable at one dimension: a base index and the delta beside it."""

    dim: int
    base: VectorIndex
    delta: Delta
    base_members: Mapping[str, np.ndarray]  # category -> positions in the base index
    shadowed: int  # delta items the base also holds: the base is asked for this many more

    @classmethod
    def make(cls, base: VectorIndex, delta: Delta, paths: Mapping[str, CategoryPath]) -> Searchable:
        in_base = np.isin(delta.ids.astype(str), base.ids) if len(delta) else np.zeros(0, dtype=bool)
        return cls(base.dim, base, delta, members(base.ids, paths), int(in_base.sum()))

    def search(self, queries: np.ndarray, k: int, category: str | None = None,
               leave_out: str | None = None) -> list[list[Hit]]:
        """Each query's k best items of base and delta, best first; the delta wins where both hold an id."""
        extra = self.shadowed + (leave_out is not None)
        allowed = None if category is None else self.base_members.get(category, np.zeros(0, dtype=np.int64))
        base = top(self.base.faiss_index, self.base.ids, queries, k + extra, allowed, self.base.params)
        delta = self.delta.search(queries, k + (leave_out is not None), category)
        return [merge(b, d, k, self.delta.row, leave_out) for b, d in zip(base, delta)]


def merge(base: list[Hit], delta: list[Hit], k: int, in_delta: Mapping[str, int],
          leave_out: str | None = None) -> list[Hit]:
    """The k best of both lists, best first: a base hit whose id the delta holds is dropped (the
    delta's vector is the current one), and so is `leave_out`."""
    kept = [hit for hit in base if hit.item_id not in in_delta and hit.item_id != leave_out]
    kept += [hit for hit in delta if hit.item_id != leave_out]
    return sorted(kept, key=lambda hit: (-hit.score, hit.item_id))[:k]


# ---------------------------------------------------------------- the state


@dataclass(frozen=True)
class ServingState:
    """One store version, ready to answer: see the module docstring."""

    version: str
    model: str  # the model that made the version
    made_by_serving_model: bool  # text and image queries are encoded by the serving model: only then comparable
    dim: int
    dims: tuple[int, ...]
    stored: Rows  # the version's items as loaded
    added: Rows  # items added through the service since
    searchable: Mapping[int, Searchable]
    paths: Mapping[str, CategoryPath]
    manifest: Mapping[str, object]
    loaded_at: float = field(default_factory=time.time)

    @property
    def base_items(self) -> int:
        return self.searchable[self.dim].base.size

    @property
    def delta_items(self) -> int:
        return len(self.searchable[self.dim].delta)

    @property
    def count(self) -> int:
        return len(self.stored) + len(self.added)

    def holds(self, item_id: str) -> bool:
        return item_id in self.added or item_id in self.stored

    def check_dim(self, dim: int | None) -> int:
        return checked_dim(dim, self.dims, f"store version {self.version}")

    def vectors(self, ids: Sequence[str], dim: int) -> tuple[list[str], list[str], np.ndarray]:
        """(found, missing, vectors of found at `dim`): the stored representation, items added through
        the service first."""
        found, missing, parts = [], [], []
        for item_id in ids:
            rows = self.added if item_id in self.added else self.stored if item_id in self.stored else None
            if rows is None:
                missing.append(item_id)
            else:
                found.append(item_id)
                parts.append(rows.vectors[rows.row[item_id]])
        if not parts:
            return found, missing, np.zeros((0, dim), dtype=np.float32)
        return found, missing, prefix(np.stack(parts).astype(np.float32), dim)

    def search(self, queries: np.ndarray, k: int, dim: int, category: str | None = None,
               leave_out: str | None = None) -> list[list[Hit]]:
        return self.searchable[dim].search(queries, k, category, leave_out)

    def with_items(self, ids: Sequence[str], vectors: np.ndarray, paths: Mapping[str, CategoryPath]) -> ServingState:
        """A new state that also holds these items (full-dimension vectors), in every dimension's delta."""
        stored16 = np.asarray(vectors, dtype=np.float32)
        stored16 = (stored16 / np.linalg.norm(stored16, axis=1, keepdims=True)).astype(np.float16)
        all_paths = MappingProxyType({**self.paths, **paths})
        searchable = {}
        for dim, part in self.searchable.items():  # new ids are in no base (the service refuses held ones)
            delta = part.delta.plus(ids, prefix(stored16.astype(np.float32), dim), all_paths)
            searchable[dim] = replace(part, delta=delta)
        return replace(self, added=self.added.plus(ids, stored16), searchable=MappingProxyType(searchable),
                       paths=all_paths)


def load_state(run_dir, stored: StoreVersion, serving_digest: str | None,
               paths: Mapping[str, CategoryPath]) -> ServingState:
    """The state of store version `stored`: its vectors read, every dimension made searchable."""
    rows = stored_rows(stored)
    if len(rows) == 0:
        raise UserError(f"store version {stored.name} holds no items: there is nothing to search")
    dims = tuple(sorted({*stored.matryoshka_dims, stored.dim}))
    paths = MappingProxyType(dict(paths))
    searchable = {dim: searchable_at(run_dir, stored, rows, dim, paths) for dim in dims}
    manifest = stored.manifest
    return ServingState(
        version=stored.name, model=str(manifest.get("model")), dim=stored.dim, dims=dims,
        made_by_serving_model=serving_digest is not None and manifest.get("checkpoint_digest") == serving_digest,
        stored=rows, added=Rows([], np.zeros((0, stored.dim), dtype=np.float16)),
        searchable=MappingProxyType(searchable), paths=paths, manifest=MappingProxyType(dict(manifest)))


def searchable_at(run_dir, stored: StoreVersion, rows: Rows, dim: int, paths: Mapping[str, CategoryPath]) -> Searchable:
    """The saved index at `dim` (else an exact one built from the stored vectors) and, in the delta,
    every item of the version that index lacks."""
    ids = np.asarray(rows.ids, dtype=str)
    base = saved_index(run_dir, stored, ids, dim) or VectorIndex.build(rows.at(dim), ids, kind="exact")
    lagging = np.flatnonzero(~np.isin(ids, base.ids))
    delta = Delta(dim, ids[lagging].tolist(), rows.at(dim, lagging), paths)
    return Searchable.make(base, delta, paths)


def saved_index(run_dir, stored: StoreVersion, ids: np.ndarray, dim: int) -> VectorIndex | None:
    """The version's saved index at `dim`, memory-mapped, when one was built from this very version;
    else None."""
    if not built_from(run_dir, stored):
        return None
    try:
        index = load_index(run_dir, stored.name, dim, mmap=True)
    except UserError:  # none saved at this dimension
        return None
    if index.dim != dim or not np.isin(index.ids, ids).all():
        return None
    return index


def self_test(state: ServingState, probe: np.ndarray | None = None) -> None:
    """Raises unless the state answers: a stored vector finds results in every dimension, and so does
    `probe` (a vector the serving model just made) where given."""
    item = state.stored.ids[0]
    for dim in state.dims:
        _, _, vectors = state.vectors([item], dim)
        hits = state.search(vectors, 1, dim)[0]
        if not hits or not np.isfinite(hits[0].score):
            raise RuntimeError(f"self-test: a search at dim {dim} with the stored vector of {item!r} found nothing")
    if probe is not None:
        hits = state.search(prefix(probe[None], state.dim), 3, state.dim)[0]
        if not hits or not all(np.isfinite(hit.score) for hit in hits):
            raise RuntimeError("self-test: a text encoded by the serving model found nothing")
