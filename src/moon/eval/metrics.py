"""Retrieval metrics on vectors: exact inner-product search, per-query recall@K, percentile bootstrap
confidence intervals, and the relevant set of a purchase (the item, or its SPU).

Model-agnostic: everything takes numpy arrays, so any embedder's vectors are scored the same way.
`docs/metrics.md` defines each metric exactly.

    relevant = relevant_items(eval_item_ids, eval_spu_ids, catalogue_item_ids, catalogue_spu_ids, spu_hit=False)
    report = retrieval_recall(photo_vectors, catalogue_vectors, relevant, dims=(64, 128, None), seed=0)
    json.dump(report.to_dict(), f)
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

import faiss
import numpy as np

from moon import ui
from moon.errors import UserError
from moon.vectors import prefix

DEFAULT_KS = (1, 10, 50, 100)
CI_LEVEL = 0.95
QUERY_CHUNK = 4096  # queries per faiss call: bounds result memory and drives the progress bar
_CELLS = 1 << 24  # elements per temporary (pairs x K match matrix, resamples x queries draw matrix)


class CatalogueMismatch(UserError, ValueError):
    """The evaluation set names an item the catalogue lacks, or disagrees with it on an item's SPU."""


# ---------------------------------------------------------------- search


def exact_search(queries: np.ndarray, catalogue: np.ndarray, k: int,
                 advance: ui.Advance | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k with faiss `IndexFlatIP`: (scores, indices), both (queries, min(k, catalogue)).

    Vectors are used as given (normalise first for cosine; `top_k` does). `advance(n)` reports the
    queries searched to the caller's progress bar. Rows are ordered by
    score, highest first; equal float32 scores are ordered by catalogue index, lowest first, also
    across the k-th place (a tie there is widened until every tied candidate is seen).
    """
    q, c = _matrix(queries, "queries"), _matrix(catalogue, "catalogue")
    if q.shape[1] != c.shape[1]:
        raise ValueError(f"queries have {q.shape[1]} dims but the catalogue has {c.shape[1]}")
    if c.shape[0] == 0:
        raise ValueError("the catalogue is empty")
    if k < 1:
        raise ValueError(f"k={k} must be at least 1")
    k = min(int(k), c.shape[0])
    index = faiss.IndexFlatIP(c.shape[1])
    index.add(c)
    scores = np.empty((q.shape[0], k), np.float32)
    indices = np.empty((q.shape[0], k), np.int64)
    for start in range(0, q.shape[0], QUERY_CHUNK):
        block = slice(start, start + QUERY_CHUNK)
        scores[block], indices[block] = _search_block(index, q[block], k)
        if advance:
            advance(len(q[block]))
    return scores, indices


def top_k(queries: np.ndarray, catalogue: np.ndarray, k: int, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, catalogue indices) of each query's top k by cosine similarity at Matryoshka dimension
    `dim` (None: the full vector). The ranking behind every recall figure, and a gallery's rows."""
    return exact_search(prefix(queries, dim), prefix(catalogue, dim), k)


def without_self(ranked: np.ndarray, own: Sequence[int]) -> np.ndarray:
    """Item->item rankings without the query item: each row of `ranked` (queries, K) with the query's own
    catalogue index `own[q]` removed, or its last column where the item is not in the row: (queries, K-1).
    Search K+1 deep, then apply this before `recall_at_k`."""
    ranked, own = np.asarray(ranked), np.asarray(own, dtype=np.int64)
    if ranked.ndim != 2 or ranked.shape[1] < 2 or own.shape != (ranked.shape[0],):
        raise ValueError(f"need (queries, K >= 2) rankings and one own index per query, got {ranked.shape} and {own.shape}")
    is_self = ranked == own[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), ranked.shape[1] - 1)
    keep = np.ones(ranked.shape, bool)
    keep[np.arange(ranked.shape[0]), drop] = False
    return ranked[keep].reshape(ranked.shape[0], ranked.shape[1] - 1)


def _search_block(index: faiss.IndexFlatIP, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    n = index.ntotal
    width = min(k + 1, n)  # one extra place shows whether the k-th score is tied beyond the top k
    s, i = index.search(q, width)
    scores, indices = _by_score_then_index(s, i, k)
    pending = np.flatnonzero(s[:, k - 1] == s[:, k]) if width > k else np.empty(0, np.int64)
    while pending.size:  # widen tied rows until the last score seen is below the k-th (or all are seen)
        width = min(2 * width, n)
        s, i = index.search(q[pending], width)
        done = s[:, width - 1] < s[:, k - 1] if width < n else np.ones(len(pending), bool)
        scores[pending[done]], indices[pending[done]] = _by_score_then_index(s[done], i[done], k)
        pending = pending[~done]
    return scores, indices


def _by_score_then_index(s: np.ndarray, i: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((i, -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1)


# ---------------------------------------------------------------- recall


def first_relevant_rank(ranked: np.ndarray, relevant: Sequence[Collection[int]]) -> np.ndarray:
    """Per query, the 0-based position in its `ranked` row of the first relevant catalogue index;
    -1 where none is in the row. `ranked` is (queries, K) catalogue indices, best first."""
    ranked = np.asarray(ranked)
    if ranked.ndim != 2:
        raise ValueError(f"ranked must be (queries, K) catalogue indices, got shape {ranked.shape}")
    n, width = ranked.shape
    if len(relevant) != n:
        raise ValueError(f"{len(relevant)} relevant sets for {n} ranked queries")
    sizes = np.fromiter((len(r) for r in relevant), np.int64, count=n)
    if n and (empty := np.flatnonzero(sizes == 0)).size:
        raise ValueError(f"{empty.size} queries have no relevant item (first: query {empty[0]}); "
                         "recall is undefined for them, so leave them out of the evaluation set")
    query = np.repeat(np.arange(n), sizes)
    item = np.fromiter(itertools.chain.from_iterable(relevant), np.int64, count=int(sizes.sum()))
    if item.size and item.min() < 0:
        raise ValueError(f"relevant catalogue indices must be >= 0, got {item.min()}")
    best = np.full(n, width, np.int64)
    step = max(1, _CELLS // max(width, 1))
    for start in range(0, item.size, step):
        rows, wanted = query[start:start + step], item[start:start + step]
        match = ranked[rows] == wanted[:, None]
        np.minimum.at(best, rows, np.where(match.any(axis=1), match.argmax(axis=1), width))
    best[best == width] = -1
    return best


def recall_at_k(ranked: np.ndarray, relevant: Sequence[Collection[int]], ks: Iterable[int]) -> dict[int, np.ndarray]:
    """{k: per-query hits}, a float64 vector with 1.0 where any relevant catalogue index is among the
    first k of the query's `ranked` row, else 0.0. Its mean is recall@k; keep the vector to bootstrap.

    Every k must be <= ranked.shape[1]: search with k = max(ks) (clipped to the catalogue size).
    """
    ranked = np.asarray(ranked)
    ks = _ks(ks)
    if ranked.ndim == 2 and ks[-1] > ranked.shape[1]:
        raise ValueError(f"recall@{ks[-1]} needs the top {ks[-1]}, but ranked has only {ranked.shape[1]} columns")
    rank = first_relevant_rank(ranked, relevant)
    found = rank >= 0
    return {k: (found & (rank < k)).astype(np.float64) for k in ks}


def bootstrap_ci(hits: np.ndarray, seed: int, resamples: int = 1000, level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-query `hits`: `resamples` resamplings of the
    queries with replacement (numpy `default_rng(seed)`), cut at the (1-level)/2 and (1+level)/2 quantiles.

    Same hits, seed and resamples give the same interval; the same seed on equally many queries
    draws the same resamples, so intervals of several metrics on one query set share them.
    """
    values = np.asarray(hits, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"hits must be a non-empty vector with one value per query, got shape {values.shape}")
    if resamples < 1:
        raise ValueError(f"resamples={resamples} must be at least 1")
    if not 0 < level < 1:
        raise ValueError(f"level={level} must lie strictly between 0 and 1")
    rng = np.random.default_rng(seed)
    n = values.size
    means = np.empty(resamples)
    step = max(1, _CELLS // n)
    for start in range(0, resamples, step):
        stop = min(resamples, start + step)
        means[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    lo, hi = np.clip([lo, hi], values.min(), values.max())  # rounding must not leave the data's range
    return float(lo), float(hi)


# ---------------------------------------------------------------- the report


@dataclass(frozen=True)
class Recall:
    value: float  # mean of the per-query hits
    ci95: tuple[float, float]  # percentile bootstrap interval over queries


@dataclass
class RecallReport:
    """recall@K with its 95% interval for every Matryoshka dimension; `to_dict()` is the JSON form."""

    queries: int
    catalogue: int
    recall: dict[int, dict[int, Recall]]  # dim -> k -> Recall
    hits: dict[int, dict[int, np.ndarray]] = field(repr=False)  # dim -> k -> per-query hits (paired comparisons)
    seed: int = 0
    resamples: int = 1000
    # (scores, catalogue indices) of each query's top max(ks) at the full dimension, best first,
    # the ranking its recall was computed from; None when the full dimension was not scored
    top: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {
            "dims": {
                str(dim): {f"recall@{k}": {"value": r.value, "ci95": list(r.ci95)} for k, r in by_k.items()}
                for dim, by_k in self.recall.items()
            },
            "queries": self.queries,
            "catalogue": self.catalogue,
            "bootstrap": {"method": "percentile", "level": CI_LEVEL, "resamples": self.resamples, "seed": self.seed},
        }


def retrieval_recall(
    query_vectors: np.ndarray,
    catalogue_vectors: np.ndarray,
    relevant: Sequence[Collection[int]],
    ks: Iterable[int] = DEFAULT_KS,
    dims: Iterable[int | None] | None = None,
    seed: int = 0,
    resamples: int = 1000,
    exclude: Sequence[int] | None = None,
) -> RecallReport:
    """recall@K (K in `ks`) of each query against the whole catalogue, exact cosine search, at every
    Matryoshka dimension in `dims` (a prefix, re-normalised; None or a None entry: the full vector).

    `relevant[q]` holds the catalogue row indices that count as a hit for query q (`relevant_items`).
    A K above the catalogue size ranks the whole catalogue.

    `exclude[q]`, for item -> item queries, is the query item's own catalogue row: it is left out of
    the query's ranking (searched one deeper, then `without_self`) and out of its relevant set, since
    an item finding itself says nothing.
    """
    q, c = _matrix(query_vectors, "query_vectors"), _matrix(catalogue_vectors, "catalogue_vectors")
    if len(relevant) != q.shape[0]:
        raise ValueError(f"{len(relevant)} relevant sets for {q.shape[0]} query vectors")
    if q.shape[0] == 0:
        raise ValueError("there are no queries to evaluate")
    out_of_range = [i for r in relevant for i in r if not 0 <= i < c.shape[0]]
    if out_of_range:
        raise ValueError(f"relevant index {out_of_range[0]} is outside the catalogue's {c.shape[0]} rows")
    if exclude is not None:
        if len(exclude) != q.shape[0]:
            raise ValueError(f"{len(exclude)} excluded rows for {q.shape[0]} query vectors")
        relevant = [[i for i in r if i != own] for r, own in zip(relevant, exclude)]
    ks = _ks(ks)
    full = q.shape[1]
    chosen = list(dict.fromkeys(full if d is None else int(d) for d in (dims if dims is not None else [None])))
    recall, hits, top = {}, {}, None
    for dim in chosen:
        if exclude is None:
            scores, ranked = top_k(q, c, ks[-1], dim)
            top = (scores, ranked) if dim == full else top
        else:
            ranked = without_self(top_k(q, c, ks[-1] + 1, dim)[1], exclude)
        by_clipped = recall_at_k(ranked, relevant, {min(k, ranked.shape[1]) for k in ks})
        hits[dim] = {k: by_clipped[min(k, ranked.shape[1])] for k in ks}
        recall[dim] = {k: Recall(float(h.mean()), bootstrap_ci(h, seed, resamples)) for k, h in hits[dim].items()}
    return RecallReport(q.shape[0], c.shape[0], recall, hits, seed, resamples, top)


# ---------------------------------------------------------------- relevance


def relevant_items(
    target_item_ids: Sequence[str],
    target_spu_ids: Sequence[str] | None,
    catalogue_item_ids: Sequence[str],
    catalogue_spu_ids: Sequence[str] | None,
    spu_hit: bool,
) -> list[list[int]]:
    """Per target (e.g. the purchased item of an `eval_image_search` row), the sorted catalogue row
    indices that count as a hit: the item itself, or with `spu_hit` every SKU sharing its SPU.

    Accepts lists, numpy or pyarrow arrays. The SPU ids may be None when `spu_hit` is False; when
    both are given they must agree. A target missing from the catalogue raises `CatalogueMismatch`
    (a ValueError), naming it.
    """
    targets, items = _strings(target_item_ids), _strings(catalogue_item_ids)
    row = {item: i for i, item in enumerate(items)}
    if len(row) != len(items):
        seen: set = set()
        duplicate = next(item for item in items if item in seen or seen.add(item))
        raise ValueError(f"catalogue item ids must be unique; {duplicate!r} appears more than once")
    missing = list(dict.fromkeys(t for t in targets if t not in row))
    if missing:
        raise CatalogueMismatch(
            f"{len(missing)} target item(s) are not in the catalogue, e.g. {', '.join(map(repr, missing[:5]))}: "
            "score the catalogue (representation store version) that the evaluation set was drawn from")
    found = [row[t] for t in targets]
    if catalogue_spu_ids is None:
        if spu_hit:
            raise ValueError("spu_hit=True needs catalogue_spu_ids")
        return [[i] for i in found]
    spus = _strings(catalogue_spu_ids)
    if len(spus) != len(items):
        raise ValueError(f"{len(spus)} catalogue SPU ids for {len(items)} catalogue items")
    if target_spu_ids is not None:
        target_spus = _strings(target_spu_ids)
        if len(target_spus) != len(targets):
            raise ValueError(f"{len(target_spus)} target SPU ids for {len(targets)} target items")
        for t, spu, i in zip(targets, target_spus, found):
            if spus[i] != spu:
                raise CatalogueMismatch(f"target item {t!r} has SPU {spu!r} but the catalogue says {spus[i]!r}")
    if not spu_hit:
        return [[i] for i in found]
    siblings: dict[str, list[int]] = {}
    for i, spu in enumerate(spus):
        siblings.setdefault(spu, []).append(i)  # ascending, since i is
    return [list(siblings[spus[i]]) for i in found]


def relevant_sets(
    target_groups: Sequence[Sequence[str]],
    catalogue_item_ids: Sequence[str],
    catalogue_spu_ids: Sequence[str] | None,
    spu_hit: bool,
) -> list[list[int]]:
    """Per query with several targets (e.g. every item a text query's session clicked, carted or
    bought), the sorted union of their relevant catalogue rows (`relevant_items` of each target)."""
    flat = [target for group in target_groups for target in group]
    rows = relevant_items(flat, None, catalogue_item_ids, catalogue_spu_ids, spu_hit)
    out, start = [], 0
    for group in target_groups:
        out.append(sorted({i for r in rows[start:start + len(group)] for i in r}))
        start += len(group)
    return out


# ---------------------------------------------------------------- helpers


def _matrix(x, name: str) -> np.ndarray:
    a = np.ascontiguousarray(x, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (rows, dims) array, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def _ks(ks: Iterable[int]) -> list[int]:
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    return ks


def _strings(values) -> list:
    return values.to_pylist() if hasattr(values, "to_pylist") else list(values)
