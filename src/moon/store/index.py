"""The vector index over catalogue representations: one small interface, three faiss index kinds.

Every kind scores by inner product on L2-normalised vectors (cosine similarity); the index
normalises whatever it is given, so callers pass raw embedder output. Items are named by string
ids; faiss sees only their positions (0..size-1, in the order they were added), so the id array
saved beside the faiss file keeps ids right across `add`, `save` and `load`.

    index = VectorIndex.build(vectors, item_ids)            # kind="auto"
    scores, ids = index.search(queries, k=10)               # (queries, k) float32, (queries, k) str
    index.add(new_vectors, new_item_ids)                    # items launched since the build
    index.save(run_dir / "index")                           # faiss file + ids.npy + index.json
    print(ann_recall(index, vectors))                       # recall@10 against exact search

How "auto" chooses, by the number of items n at build time:

- n <= `EXACT_UP_TO` (50k): exact search (`IndexFlatIP`). Brute force over 50k vectors of
  128 dims is a few milliseconds per query on one core and much less per query in a batch,
  it needs no build and no training, and its answers are exact, so an approximate index
  would buy nothing worth its build time and its extra memory.
- n <= `HNSW_UP_TO` (2M): HNSW graph (`IndexHNSWFlat`, M=32). Sub-millisecond queries with
  recall near exact search, and items can be added one at a time. It keeps every full
  float32 vector plus about 2*M links per item in memory (about 0.8 KB per 128-dim item,
  1.6 GB at 2M) and its build grows to tens of minutes on a few cores, which sets the ceiling.
- above: IVF-PQ (`IndexIVFPQ`). Vectors are compressed to `m` one-byte codes (32 bytes for
  128 dims) in about 4*sqrt(n) inverted lists, trained by k-means on a seeded sample, so
  memory and build time stay bounded; recall is lower, so check it with `ann_recall`.

The kind is fixed at build time: adding items never switches it; rebuild to re-choose.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from moon import ui
from moon.errors import UserError
from moon.io.atomic import atomic_dir

Kind = Literal["auto", "exact", "hnsw", "ivfpq"]
KINDS = ("exact", "hnsw", "ivfpq")

EXACT_UP_TO = 50_000  # auto: exact search up to this many items
HNSW_UP_TO = 2_000_000  # auto: HNSW up to this many items, IVF-PQ above

HNSW_M = 32  # graph links per item (layer 0 has twice as many)
HNSW_EF_CONSTRUCTION = 80  # candidate list while linking a new item: graph quality against build time
HNSW_EF_SEARCH = 64  # candidate list while searching: recall against query time

IVF_LISTS_PER_SQRT_N = 4  # nlist = 4 * sqrt(n), the usual rule for inverted lists
IVF_MIN_POINTS_PER_CENTROID = 39  # faiss k-means wants this many training points per centroid
IVF_TRAIN_PER_LIST = 64  # training sample: this many vectors per inverted list (at most n)
IVF_NPROBE = 32  # inverted lists visited per query
IVFPQ_MIN_ITEMS = 1000  # fewer items cannot train the codebooks; use exact search
PQ_DIMS_PER_CODE = 4  # each one-byte code covers this many dims...
PQ_MAX_CODES = 64  # ...with at most this many codes per vector
PQ_BITS = 8  # bits per code (fewer when the sample is too small to train 256 centroids)

ADD_CHUNK = 65_536  # vectors per faiss add call: drives the progress bar

FORMAT = 1
FAISS_FILE = "index.faiss"
IDS_FILE = "ids.npy"
META_FILE = "index.json"


class VectorIndexError(UserError, ValueError):
    """Input the index cannot take (wrong width, NaN, bad or duplicate ids) or a folder it cannot load."""


class VectorIndex:
    """Top-k inner-product search over L2-normalised item vectors, named by string ids.

    Build with `VectorIndex.build` or `VectorIndex.load`. `search` may run from several threads at
    once; `add` and `save` need the caller to hold searches off while they run.
    """

    def __init__(self, index: faiss.Index, ids: np.ndarray, kind: str, params: dict, seed: int = 0,
                 sorted_ids: np.ndarray | None = None):
        self._index = index
        self._labels = np.append(ids, "")  # faiss answers -1 for an unfilled place: labels[-1] is ""
        self._sorted = sorted_ids  # for duplicate checks in `add`; built on first need
        self.kind = kind
        self.params = dict(params)
        self.seed = seed
        self.mapped = False  # a memory-mapped faiss file (`load(mmap=True)`): read-only

    # ------------------------------------------------------------ making one

    @classmethod
    def build(cls, vectors: np.ndarray, ids, kind: Kind = "auto", seed: int = 0) -> VectorIndex:
        """An index over `vectors` (n, d) named by `ids` (n strings, unique). `kind` "auto" picks by
        n (see the module docstring); `seed` draws IVF-PQ's training sample and seeds its k-means."""
        if kind != "auto" and kind not in KINDS:
            raise VectorIndexError(f"kind={kind!r} is not an index kind; use one of: auto, {', '.join(KINDS)}")
        x = _unit(vectors, "vectors")
        if x.shape[0] == 0:
            raise VectorIndexError("there are no vectors to index: build from at least one (n, dim) row")
        labels = _as_ids(ids, x.shape[0])
        sorted_ids = np.sort(labels)
        _refuse_duplicates(sorted_ids, "ids")
        chosen = choose_kind(x.shape[0]) if kind == "auto" else kind
        if chosen == "exact":
            index, params = faiss.IndexFlatIP(x.shape[1]), {}
        elif chosen == "hnsw":
            index, params = _hnsw(x.shape[1])
        else:
            index, params = _ivfpq(x, seed)
        _configure(index, chosen, params)
        _add_in_chunks(index, x)
        return cls(index, labels, chosen, params, seed, sorted_ids)

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = False) -> VectorIndex:
        """The index that `save(directory)` wrote. `mmap` maps the faiss file read-only instead of
        reading it (a load takes no time and processes share the page cache); a mapped index
        cannot be added to."""
        folder = Path(directory)
        if not (folder / META_FILE).is_file():
            raise VectorIndexError(f"{folder} is not a saved vector index ({META_FILE} is missing); "
                                   "write one with VectorIndex.save")
        meta = json.loads((folder / META_FILE).read_text())
        if meta.get("format") != FORMAT:
            raise VectorIndexError(f"{folder} holds index format {meta.get('format')}, this version reads {FORMAT}: "
                                   "rebuild the index")
        for name in (FAISS_FILE, IDS_FILE):
            if not (folder / name).is_file():
                raise VectorIndexError(f"{folder} lacks {name}: the save was cut short; save or build it again")
        flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
        index = faiss.read_index(str(folder / FAISS_FILE), flags)
        ids = np.load(folder / IDS_FILE, allow_pickle=False)
        if not (index.ntotal == len(ids) == meta["size"]) or index.d != meta["dim"]:
            raise VectorIndexError(f"{folder} is inconsistent: {index.ntotal} vectors of {index.d} dims, "
                                   f"{len(ids)} ids, {META_FILE} says {meta['size']} of {meta['dim']}; "
                                   "save or build it again")
        _configure(index, meta["kind"], meta["params"])
        loaded = cls(index, ids, meta["kind"], meta["params"], meta.get("seed", 0))
        loaded.mapped = mmap
        return loaded

    # ------------------------------------------------------------ using one

    @property
    def size(self) -> int:
        return len(self._labels) - 1

    @property
    def dim(self) -> int:
        return self._index.d

    @property
    def faiss_index(self) -> faiss.Index:
        """The faiss index underneath, for tools that inspect or benchmark it; positions are its labels."""
        return self._index

    @property
    def ids(self) -> np.ndarray:
        """The item ids in position order (read-only)."""
        view = self._labels[:-1]
        view.flags.writeable = False
        return view

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"VectorIndex(kind={self.kind!r}, size={self.size}, dim={self.dim})"

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), both (queries, min(k, size)): each query's nearest items by cosine similarity,
        best first. Where an approximate index finds fewer than that many, the unfilled places hold
        id "" and score -inf."""
        scores, positions = self._search_unit(_unit(queries, "queries", self.dim), k)
        return scores, self._labels[positions]

    def add(self, vectors: np.ndarray, ids) -> None:
        """Indexes new items after the existing ones. An id already in the index is refused: an item's
        vector changes only by rebuilding, so an index never holds two answers for one id."""
        if self.mapped:  # faiss aborts the whole process on a write to a mapped index: refuse it here
            raise VectorIndexError("this index is memory-mapped (loaded with mmap=True), so it is read-only: "
                                   "load it without mmap to add items")
        x = _unit(vectors, "vectors", self.dim)
        labels = _as_ids(ids, x.shape[0])
        if x.shape[0] == 0:
            return
        new = np.sort(labels)
        _refuse_duplicates(new, "the new ids")
        known = self._sorted if self._sorted is not None else np.sort(self.ids)
        at = np.searchsorted(known, new)
        present = np.flatnonzero(known[np.minimum(at, len(known) - 1)] == new)
        if present.size:
            raise VectorIndexError(f"{present.size} id(s) are already in the index, e.g. {str(new[present[0]])!r}: "
                                   "add only new items; to change an item's vector, build the index again")
        _add_in_chunks(self._index, x)
        self._labels = np.concatenate([self._labels[:-1], labels, [""]])
        width = np.promote_types(known.dtype, new.dtype)
        self._sorted = np.insert(known.astype(width, copy=False), at, new)

    def save(self, directory: str | Path) -> Path:
        """Writes the faiss index, `ids.npy` and `index.json` into a temporary folder beside `directory`,
        then renames it into place, so a reader never sees half an index. Replaces a saved index there."""
        final = Path(directory)
        if final.exists() and not (final / META_FILE).is_file() and (not final.is_dir() or any(final.iterdir())):
            raise VectorIndexError(f"{final} exists and is not a saved vector index; save to a new or empty folder")
        with atomic_dir(final) as tmp:
            faiss.write_index(self._index, str(tmp / FAISS_FILE))
            np.save(tmp / IDS_FILE, self.ids, allow_pickle=False)
            (tmp / META_FILE).write_text(json.dumps(self.describe(), indent=2) + "\n")
        return final

    def describe(self) -> dict:
        """What `index.json` records: kind, width, size, build parameters."""
        return {
            "format": FORMAT,
            "kind": self.kind,
            "dim": self.dim,
            "size": self.size,
            "metric": "inner_product",
            "normalised": True,
            "params": self.params,
            "seed": self.seed,
            "faiss_version": faiss.__version__,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    def _search_unit(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """faiss (scores, positions) for already normalised queries, unfilled places at -inf."""
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise VectorIndexError(f"k={k!r} must be a positive integer")
        scores, positions = self._index.search(q, min(int(k), self.size))
        unfilled = positions < 0
        if unfilled.any():
            scores[unfilled] = -np.inf
        return scores, positions


# ---------------------------------------------------------------- kinds


def choose_kind(n: int) -> str:
    """The kind "auto" builds for n items: exact up to EXACT_UP_TO, HNSW up to HNSW_UP_TO, else IVF-PQ."""
    if n <= EXACT_UP_TO:
        return "exact"
    return "hnsw" if n <= HNSW_UP_TO else "ivfpq"


def _hnsw(dim: int) -> tuple[faiss.Index, dict]:
    params = {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": HNSW_EF_SEARCH}
    index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    return index, params


def _ivfpq(x: np.ndarray, seed: int) -> tuple[faiss.Index, dict]:
    """An IVF-PQ index trained on a seeded sample of `x`, sized for its row count."""
    n, dim = x.shape
    if n < IVFPQ_MIN_ITEMS:
        raise VectorIndexError(f"IVF-PQ learns its codebooks from the vectors and needs at least {IVFPQ_MIN_ITEMS}, "
                               f"got {n}: use kind='exact' (or 'auto')")
    nlist = max(1, min(round(IVF_LISTS_PER_SQRT_N * math.sqrt(n)), n // IVF_MIN_POINTS_PER_CENTROID))
    train_size = min(n, IVF_TRAIN_PER_LIST * nlist)
    nbits = max(1, min(PQ_BITS, int(math.log2(train_size / IVF_MIN_POINTS_PER_CENTROID))))
    m = pq_codes(dim)
    params = {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": min(IVF_NPROBE, nlist), "train_size": train_size}
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.pq.cp.seed = seed
    rows = np.sort(np.random.default_rng(seed).choice(n, size=train_size, replace=False))
    index.train(x[rows])
    return index, params


def pq_codes(dim: int) -> int:
    """PQ sub-quantizers for `dim`: the largest divisor of dim covering at least PQ_DIMS_PER_CODE dims
    each, at most PQ_MAX_CODES (128 dims -> 32 codes, 32 -> 8, 1024 -> 64)."""
    ceiling = max(1, min(dim // PQ_DIMS_PER_CODE, PQ_MAX_CODES))
    return next(m for m in range(ceiling, 0, -1) if dim % m == 0)


def _configure(index: faiss.Index, kind: str, params: dict) -> None:
    """Sets the search-time parameters, which faiss keeps on the index object."""
    if kind == "hnsw":
        index.hnsw.efSearch = params["ef_search"]
    elif kind == "ivfpq":
        index.nprobe = params["nprobe"]


def _add_in_chunks(index: faiss.Index, x: np.ndarray) -> None:
    """faiss `add`, in chunks under a progress bar when there is more than one.

    An HNSW graph takes its vectors in one call: faiss links a batch level by level, and a
    graph grown chunk by chunk measured far lower recall at 1M items (0.79 against 0.97).
    """
    if x.shape[0] <= ADD_CHUNK or isinstance(index, faiss.IndexHNSW):
        index.add(x)
        return
    with ui.progress("indexing", total=x.shape[0], unit="vectors") as advance:
        for start in range(0, x.shape[0], ADD_CHUNK):
            index.add(x[start:start + ADD_CHUNK])
            advance(min(ADD_CHUNK, x.shape[0] - start))


# ---------------------------------------------------------------- checks


def ann_recall(index: VectorIndex, vectors: np.ndarray, sample: int = 1000, k: int = 10, seed: int = 0) -> float:
    """recall@k of `index` against exact search: `sample` of the indexed vectors (a seeded draw) are
    the queries, and the score is the mean share of each query's exact top k that the index returns.

    `vectors` are every vector the index holds, row i being the item at position i (`index.ids[i]`):
    the index may keep only compressed codes, so the exact answers come from these.
    """
    x = _unit(vectors, "vectors", index.dim)
    if x.shape[0] != index.size:
        raise VectorIndexError(f"{x.shape[0]} vectors for an index of {index.size} items: pass every vector the "
                               "index holds, in the order they were built and added")
    if sample < 1:
        raise VectorIndexError(f"sample={sample} must be at least 1")
    queries = x[np.sort(np.random.default_rng(seed).choice(index.size, size=min(sample, index.size), replace=False))]
    _, found = index._search_unit(queries, k)
    _, truth = faiss.knn(queries, x, found.shape[1], metric=faiss.METRIC_INNER_PRODUCT)
    hits = (found[:, :, None] == truth[:, None, :]).any(axis=2).sum(axis=1)
    return float(hits.mean() / found.shape[1])


def build_per_dim(vectors: np.ndarray, ids, dims: Iterable[int | None], kind: Kind = "auto",
                  seed: int = 0) -> dict[int, VectorIndex]:
    """{dim: index} for each Matryoshka dimension in `dims` (None: the full width), each built on the
    re-normalised prefix `vectors[:, :dim]`: one stored vector serves every dimension."""
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise VectorIndexError(f"vectors must be a 2-D (rows, dim) array, got shape {x.shape}")
    width = x.shape[1]
    chosen = list(dict.fromkeys(width if d is None else int(d) for d in dims))
    bad = [d for d in chosen if not 1 <= d <= width]
    if bad:
        raise VectorIndexError(f"Matryoshka dim {bad[0]} must lie in 1..{width} (the vectors' width)")
    return {dim: VectorIndex.build(x[:, :dim], ids, kind, seed) for dim in chosen}


def _unit(vectors, name: str, dim: int | None = None) -> np.ndarray:
    """`vectors` as a fresh C-contiguous float32 array with rows of length one (the caller's is untouched)."""
    x = np.array(vectors, dtype=np.float32, order="C", copy=True)
    if x.ndim != 2:
        raise VectorIndexError(f"{name} must be a 2-D (rows, dim) array, got shape {x.shape}; "
                               "pass a single vector as vector[None, :]")
    if dim is not None and x.shape[1] != dim:
        raise VectorIndexError(f"{name} have {x.shape[1]} dims but the index holds {dim}-dim vectors: use the "
                               f"embedder and Matryoshka dim the index was built with (a prefix is vectors[:, :{dim}])")
    finite = np.isfinite(x)
    if not finite.all():
        bad = np.flatnonzero(~finite.all(axis=1))
        raise VectorIndexError(f"{name} hold NaN or infinite values in {bad.size} row(s) (first: row {bad[0]}); "
                               "re-embed those items or leave them out")
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise VectorIndexError(f"{zero.size} row(s) of {name} are all zeros (first: row {zero[0]}), so they have no "
                               "direction to compare; re-embed those items or leave them out")
    x /= norms[:, None]  # in place, in float32: a million-row catalogue is not copied again
    return x


def _as_ids(ids, count: int) -> np.ndarray:
    """`ids` as a 1-D numpy str array of `count` non-empty strings."""
    a = np.asarray(ids.to_pylist() if hasattr(ids, "to_pylist") else ids)
    if a.size == 0 and a.ndim == 1:
        a = a.astype(str)
    if a.dtype.kind == "O" and all(isinstance(v, str) for v in a.ravel()):
        a = a.astype(str)
    if a.ndim != 1 or a.dtype.kind != "U":
        raise VectorIndexError(f"ids must be a 1-D list or array of strings, got {a.dtype} with shape {a.shape}; "
                               "convert numbers with ids.astype(str)")
    if len(a) != count:
        raise VectorIndexError(f"{len(a)} ids for {count} vectors: pass exactly one id per vector row")
    empty = np.flatnonzero(a == "")
    if empty.size:
        raise VectorIndexError(f"ids must be non-empty strings, but row {empty[0]} is '' "
                               "('' marks an unfilled result place)")
    return a


def _refuse_duplicates(sorted_ids: np.ndarray, name: str) -> None:
    same = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if same.size:
        raise VectorIndexError(f"{name} must be unique, but {str(sorted_ids[same[0]])!r} appears more than once")
