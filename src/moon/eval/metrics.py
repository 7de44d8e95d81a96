"""The project's metrics, in two sections.

Retrieval metrics on vectors: exact inner-product search, per-query recall@K, percentile bootstrap
confidence intervals, and the relevant set of a purchase (the item, or its SPU).

CTR metrics on predicted click probabilities: AUC, logloss, gAUC by user and by request, their 95%
intervals (DeLong, normal, group bootstrap), paired model-vs-base differences, the seed noise floor
and per-segment reports.

Model-agnostic: everything takes numpy arrays, so any embedder's vectors and any CTR model's
predictions are scored the same way. `docs/metrics.md` defines each metric exactly.

    relevant = relevant_items(eval_item_ids, eval_spu_ids, catalogue_item_ids, catalogue_spu_ids, spu_hit=False)
    report = retrieval_recall(photo_vectors, catalogue_vectors, relevant, dims=(64, 128, None), seed=0)
    json.dump(report.to_dict(), f)

    json.dump(ctr_metrics(labels, probs, users, requests, seed=0), f)
    json.dump(ctr_lifts(labels, base_probs, model_probs, users, requests, seed=0), f)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist

import faiss
import numpy as np
import pyarrow as pa

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


def bootstrap_ci(hits: np.ndarray, seed: int, resamples: int = 1000, level: float = CI_LEVEL,
                 weights: np.ndarray | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-query `hits`: `resamples` resamplings of the
    queries with replacement (numpy `default_rng(seed)`), cut at the (1-level)/2 and (1+level)/2 quantiles.
    With `weights` (one per value, e.g. a group's rows) each resample's mean is the weighted mean.

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
    weights = None if weights is None else np.asarray(weights, dtype=np.float64)
    weighted = values if weights is None else weights * values
    rng = np.random.default_rng(seed)
    n = values.size
    means = np.empty(resamples)
    step = max(1, _CELLS // n)
    for start in range(0, resamples, step):
        stop = min(resamples, start + step)
        drawn = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = weighted[drawn].sum(axis=1) / (n if weights is None else weights[drawn].sum(axis=1))
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

    def subset(self, chosen: np.ndarray) -> RecallReport:
        """The same search scored on the `chosen` queries alone (a boolean mask), at the full dimension:
        their hits are already known, so nothing is searched again."""
        full = max(self.hits)
        hits = {k: h[chosen] for k, h in self.hits[full].items()}
        recall = {k: Recall(float(h.mean()), bootstrap_ci(h, self.seed, self.resamples)) for k, h in hits.items()}
        return RecallReport(int(chosen.sum()), self.catalogue, {full: recall}, {full: hits}, self.seed, self.resamples)

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


# ================================================================ CTR metrics
#
# Everything below scores click predictions on one test set of impressions: `labels` (1 = clicked),
# predicted click probabilities or scores, and each row's user and search request. Figures come back
# as plain floats and dicts (JSON-ready: an undefined figure is None). Kept apart from the retrieval
# section above, which it shares nothing with but `CI_LEVEL`.

LOGLOSS_EPS = 1e-7  # probabilities are clipped to [eps, 1 - eps] before the log
GAUC_RESAMPLES = 1000  # group bootstrap resamples for every gAUC interval


def auc(labels, scores) -> float:
    """ROC AUC: the probability that a random clicked row scores above a random unclicked one, an
    exact tie counting one half (the Mann-Whitney count, from one sort; equals sklearn's
    `roc_auc_score`). Raises ValueError unless both labels occur."""
    y = _binary(labels)
    s = _scores(scores, y.size, "scores")
    _class_counts(y)
    return _delong(y, s)[0]


def auc_ci(labels, scores, level: float = CI_LEVEL) -> tuple[float, float]:
    """Normal interval of the AUC with DeLong's variance (the fast O(n log n) form of Sun & Xu, 2014),
    clipped to [0, 1]; (nan, nan) with fewer than two rows of either label."""
    y = _binary(labels)
    s = _scores(scores, y.size, "scores")
    _class_counts(y)
    value, v10, v01 = _delong(y, s)
    return _normal_ci(value, _delong_se(v10, v01), level, 0.0, 1.0)


def auc_difference(labels, scores_a, scores_b, level: float = CI_LEVEL) -> tuple[float, float, float]:
    """(delta, low, high): AUC(b) - AUC(a) on the same rows with its normal interval from the paired
    DeLong variance Var(A) + Var(B) - 2 Cov(A, B), computed as the variance of the per-row
    differences of the DeLong components (so a model against itself gives exactly (0, 0, 0))."""
    y = _binary(labels)
    a, b = _scores(scores_a, y.size, "scores_a"), _scores(scores_b, y.size, "scores_b")
    _class_counts(y)
    return _auc_delta(y, a, b, level)


def logloss(labels, probs) -> float:
    """Mean binary cross-entropy -[y log p + (1 - y) log(1 - p)], p clipped to [1e-7, 1 - 1e-7]."""
    y = _binary(labels)
    return float(_row_losses(y, _probs(probs, y.size, "probs")).mean())


def logloss_ci(labels, probs, level: float = CI_LEVEL) -> tuple[float, float]:
    """Normal interval of the logloss: mean ± z·sd/√n over the per-row losses (sd with ddof=1);
    the lower end is clipped at 0; (nan, nan) with a single row."""
    y = _binary(labels)
    losses = _row_losses(y, _probs(probs, y.size, "probs"))
    return _normal_ci(float(losses.mean()), _mean_se(losses), level, 0.0, math.inf)


def logloss_difference(labels, probs_a, probs_b, level: float = CI_LEVEL) -> tuple[float, float, float]:
    """(delta, low, high): logloss(b) - logloss(a) on the same rows (negative: b is better) with the
    normal interval of the mean of the paired per-row loss differences."""
    y = _binary(labels)
    a, b = _probs(probs_a, y.size, "probs_a"), _probs(probs_b, y.size, "probs_b")
    return _logloss_delta(y, a, b, level)


def grouped_auc(labels, scores, groups) -> float:
    """gAUC = Σ_g n_g·AUC_g / Σ_g n_g over the groups that hold both labels, n_g being the group's
    rows (the DIN paper's impression weighting); single-class groups are skipped. `groups` holds one
    id per row, strings or integers (a user, a search request). Vectorised: one sort by (group,
    score). Raises ValueError when no group holds both labels."""
    y = _binary(labels)
    s = _scores(scores, y.size, "scores")
    values, weights, _ = _group_aucs(y, s, _group_codes(groups, y.size, "groups"))
    _some_groups(values)
    return _weighted_mean(values, weights)


def grouped_auc_ci(labels, scores, groups, seed: int = 0, resamples: int = GAUC_RESAMPLES,
                   level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the gAUC over groups: the groups holding both labels are
    drawn with replacement (`numpy.random.default_rng(seed)`), each carrying its AUC and weight
    computed once, and the weighted mean of every resample is taken."""
    y = _binary(labels)
    s = _scores(scores, y.size, "scores")
    values, weights, _ = _group_aucs(y, s, _group_codes(groups, y.size, "groups"))
    _some_groups(values)
    return bootstrap_ci(values, seed, resamples, level, weights)


def grouped_auc_difference(labels, scores_a, scores_b, groups, seed: int = 0, resamples: int = GAUC_RESAMPLES,
                           level: float = CI_LEVEL) -> tuple[float, float, float]:
    """(delta, low, high): gAUC(b) - gAUC(a) on the same rows, with a paired group bootstrap: each
    resample draws groups once and takes the weighted mean of AUC_b,g - AUC_a,g over them."""
    y = _binary(labels)
    a, b = _scores(scores_a, y.size, "scores_a"), _scores(scores_b, y.size, "scores_b")
    codes = _group_codes(groups, y.size, "groups")
    return _gauc_delta(y, a, b, codes, seed, resamples, level)


def seed_noise(values) -> float:
    """The noise floor: sample standard deviation (ddof=1) of one metric over training seeds; nan
    with a single seed. Print it beside every difference between models."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("seed_noise needs the metric of at least one seed")
    return float(v.std(ddof=1)) if v.size > 1 else math.nan


def ctr_metrics(labels, probs, users, requests, seed: int = 0, *, resamples: int = GAUC_RESAMPLES) -> dict:
    """AUC, logloss, gAUC by user and gAUC by request of one model on one test set, each with its
    95% interval, as a JSON-ready dict:

        {"auc": {"value", "ci": [lo, hi]}, "logloss": {...},
         "gauc_user": {"value", "ci", "groups", "skipped_groups"}, "gauc_request": {...},
         "rows", "positives", "intervals": {how each interval was made}}

    A gAUC with no group holding both labels has value and ci None. Raises ValueError unless the
    set holds both labels (`segment_metrics` skips such a segment instead)."""
    y = _binary(labels)
    p = _probs(probs, y.size, "probs")
    positives, _ = _class_counts(y)
    codes = {name: _group_codes(ids, y.size, name) for name, ids in (("users", users), ("requests", requests))}
    losses = _row_losses(y, p)
    value, v10, v01 = _delong(y, p)
    out = {
        "auc": _entry(value, _normal_ci(value, _delong_se(v10, v01), CI_LEVEL, 0.0, 1.0)),
        "logloss": _entry(float(losses.mean()), _normal_ci(float(losses.mean()), _mean_se(losses), CI_LEVEL,
                                                           0.0, math.inf)),
    }
    for key, name in (("gauc_user", "users"), ("gauc_request", "requests")):
        values, weights, skipped = _group_aucs(y, p, codes[name])
        if values.size:
            entry = _entry(_weighted_mean(values, weights), bootstrap_ci(values, seed, resamples, CI_LEVEL, weights))
        else:
            entry = {"value": None, "ci": None}
        out[key] = entry | {"groups": int(values.size), "skipped_groups": skipped}
    return out | {"rows": int(y.size), "positives": positives, "intervals": _intervals(seed, resamples)}


def ctr_lifts(labels, probs_base, probs_model, users, requests, seed: int = 0, *,
              resamples: int = GAUC_RESAMPLES) -> dict:
    """Model against base on the same test rows: for AUC, logloss, gAUC by user and by request,
    {"base", "model", "delta": model - base, "ci": [lo, hi]} with paired intervals (paired DeLong,
    paired per-row losses, paired group bootstrap), plus "rows", "positives" and "intervals".
    A logloss delta below 0 is an improvement; the others improve upwards. Print `seed_noise`
    beside each delta."""
    y = _binary(labels)
    base, model = _probs(probs_base, y.size, "probs_base"), _probs(probs_model, y.size, "probs_model")
    positives, _ = _class_counts(y)
    codes = {name: _group_codes(ids, y.size, name) for name, ids in (("users", users), ("requests", requests))}
    out = {
        "auc": _lift(_delong(y, base)[0], _delong(y, model)[0], _auc_delta(y, base, model, CI_LEVEL)),
        "logloss": _lift(float(_row_losses(y, base).mean()), float(_row_losses(y, model).mean()),
                         _logloss_delta(y, base, model, CI_LEVEL)),
    }
    for key, name in (("gauc_user", "users"), ("gauc_request", "requests")):
        a, weights, _ = _group_aucs(y, base, codes[name])
        if a.size:
            b = _group_aucs(y, model, codes[name])[0]
            out[key] = _lift(_weighted_mean(a, weights), _weighted_mean(b, weights),
                             _gauc_delta_from(a, b, weights, seed, resamples, CI_LEVEL))
        else:
            out[key] = {"base": None, "model": None, "delta": None, "ci": None}
        out[key]["groups"] = int(a.size)
    return out | {"rows": int(y.size), "positives": positives, "intervals": _intervals(seed, resamples)}


def segment_metrics(labels, probs, users, requests, segments: dict[str, np.ndarray], seed: int = 0, *,
                    resamples: int = GAUC_RESAMPLES) -> dict[str, dict]:
    """`ctr_metrics` on the rows of each segment ({name: boolean row mask}, e.g. new items, image
    queries). A segment without both labels is not scored: its entry is {"skipped": reason,
    "rows", "positives"}."""
    y = _binary(labels)
    p = _probs(probs, y.size, "probs")
    user_codes = _group_codes(users, y.size, "users")
    request_codes = _group_codes(requests, y.size, "requests")
    masks = {}
    for name, mask in segments.items():
        m = np.asarray(mask)
        if m.dtype != np.bool_ or m.shape != y.shape:
            raise ValueError(f"segment {name!r} must be a boolean mask of {y.size} rows, "
                             f"got dtype {m.dtype} and shape {m.shape}")
        masks[name] = m
    out = {}
    for name, m in masks.items():
        rows, positives = int(m.sum()), int(y[m].sum())
        if positives == 0 or positives == rows:
            reason = ("no rows" if rows == 0 else
                      f"only {'unclicked' if positives == 0 else 'clicked'} rows: AUC needs both labels")
            out[name] = {"skipped": reason, "rows": rows, "positives": positives}
        else:
            out[name] = ctr_metrics(y[m], p[m], user_codes[m], request_codes[m], seed, resamples=resamples)
    return out


# ---------------------------------------------------------------- CTR helpers


def _binary(labels) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be a vector with one 0/1 label per row, got shape {y.shape}")
    if y.dtype == np.bool_:
        return y
    if y.dtype.kind not in "iuf" or not ((y == 0) | (y == 1)).all():
        raise ValueError("labels must be 0/1 (or booleans), 1 for a click")
    return y == 1


def _scores(scores, n: int, name: str) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (n,):
        raise ValueError(f"{name} must be a vector of {n} scores, one per label, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return s


def _probs(probs, n: int, name: str) -> np.ndarray:
    p = _scores(probs, n, name)
    if p.size and (p.min() < 0 or p.max() > 1):
        raise ValueError(f"{name} must be probabilities in [0, 1], got values in [{p.min():g}, {p.max():g}]: "
                         "apply the sigmoid to logits first")
    return p


def _class_counts(y: np.ndarray) -> tuple[int, int]:
    positives = int(y.sum())
    if positives == 0 or positives == y.size:
        raise ValueError(f"AUC needs both labels, but all {y.size} rows are {'clicks' if positives else 'non-clicks'}")
    return positives, int(y.size) - positives


def _group_codes(groups, n: int, name: str) -> np.ndarray:
    """Integer codes 0..G-1 of the group ids (every code used). Strings held as Python objects
    (lists, pyarrow columns) are hashed by pyarrow, far faster than sorting them."""
    g = np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"{name} must hold one group id per row ({n}), got shape {g.shape}")
    if g.dtype != object:
        return np.unique(g, return_inverse=True)[1].reshape(n).astype(np.int64, copy=False)
    try:
        ids = pa.array(g)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ValueError(f"{name} ids must be all strings or all numbers: {e}") from e
    if ids.null_count:
        raise ValueError(f"{name} holds {ids.null_count} missing (None) ids: give every row its group")
    return ids.dictionary_encode().indices.to_numpy(zero_copy_only=False).astype(np.int64)


def _tie_blocks(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ascending keys: (block of each row, first row of each block), a block being a run of equal keys."""
    new = np.ones(sorted_keys.size, bool)
    new[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return np.cumsum(new) - 1, np.flatnonzero(new)


def _delong(y: np.ndarray, s: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(AUC, v10, v01) from one sort. DeLong's structural components, in row order: v10 per clicked
    row, the share of unclicked rows it outscores; v01 per unclicked row, the share of clicked rows
    that outscore it; an exact tie counts one half. Both average to the AUC, computed exactly as
    U / (clicked · unclicked) with U the Mann-Whitney count."""
    positives = int(y.sum())
    negatives = y.size - positives
    order = np.argsort(s)
    sorted_y = y[order]
    block, _ = _tie_blocks(s[order])
    pos_in = np.bincount(block, weights=sorted_y)
    neg_in = np.bincount(block) - pos_in
    beats = np.cumsum(neg_in) - neg_in / 2  # unclicked rows below the block, plus half of those in it
    beaten = positives - np.cumsum(pos_in) + pos_in / 2  # clicked rows above the block, plus half of those in it
    value = float((pos_in * beats).sum() / (positives * negatives))
    per_row = np.empty(y.size)
    per_row[order] = np.where(sorted_y, beats[block] / negatives, beaten[block] / positives)
    return value, per_row[y], per_row[~y]


def _delong_se(v10: np.ndarray, v01: np.ndarray) -> float:
    if v10.size < 2 or v01.size < 2:
        return math.nan
    return math.sqrt(v10.var(ddof=1) / v10.size + v01.var(ddof=1) / v01.size)


def _auc_delta(y: np.ndarray, a: np.ndarray, b: np.ndarray, level: float) -> tuple[float, float, float]:
    auc_a, a10, a01 = _delong(y, a)
    auc_b, b10, b01 = _delong(y, b)
    delta = auc_b - auc_a
    return (delta, *_normal_ci(delta, _delong_se(b10 - a10, b01 - a01), level, -1.0, 1.0))


def _row_losses(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    p = np.clip(p, LOGLOSS_EPS, 1 - LOGLOSS_EPS)
    return -np.where(y, np.log(p), np.log1p(-p))


def _mean_se(values: np.ndarray) -> float:
    return math.sqrt(values.var(ddof=1) / values.size) if values.size > 1 else math.nan


def _logloss_delta(y: np.ndarray, a: np.ndarray, b: np.ndarray, level: float) -> tuple[float, float, float]:
    la, lb = _row_losses(y, a), _row_losses(y, b)
    delta = float(lb.mean() - la.mean())
    return (delta, *_normal_ci(delta, _mean_se(lb - la), level, -math.inf, math.inf))


def _group_aucs(y: np.ndarray, s: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(AUC, rows) of every group holding both labels, in group-code order, and how many groups
    (with rows) were skipped for holding one label only. One sort by (group, score): each group's
    Mann-Whitney count is summed over its tie blocks, as in `_delong`."""
    if y.size == 0:
        return np.empty(0), np.empty(0), 0
    count = int(codes.max()) + 1
    by_score = np.argsort(s)
    dense = np.empty(s.size, np.int64)
    dense[by_score] = _tie_blocks(s[by_score])[0]  # equal scores, equal rank
    key = codes * (int(dense[by_score[-1]]) + 1) + dense
    order = np.argsort(key)
    block, starts = _tie_blocks(key[order])
    pos_in = np.bincount(block, weights=y[order])
    neg_in = np.bincount(block) - pos_in
    block_group = codes[order][starts]  # ascending
    below = np.cumsum(neg_in) - neg_in  # unclicked rows in earlier blocks, any group
    below -= below[np.searchsorted(block_group, block_group)]  # ... of the block's own group
    u = np.bincount(block_group, weights=pos_in * (below + neg_in / 2), minlength=count)
    rows = np.bincount(codes, minlength=count).astype(np.float64)
    positives = np.bincount(codes, weights=y, minlength=count)
    negatives = rows - positives
    keep = (positives > 0) & (negatives > 0)
    skipped = int(((rows > 0) & ~keep).sum())
    return u[keep] / (positives[keep] * negatives[keep]), rows[keep], skipped


def _some_groups(values: np.ndarray) -> None:
    if values.size == 0:
        raise ValueError("gAUC is undefined: no group holds both a clicked and an unclicked row")


def _weighted_mean(values: np.ndarray, weights: np.ndarray) -> float:
    return float((weights * values).sum() / weights.sum())


def _gauc_delta(y, a, b, codes, seed, resamples, level) -> tuple[float, float, float]:
    values_a, weights, _ = _group_aucs(y, a, codes)
    _some_groups(values_a)
    return _gauc_delta_from(values_a, _group_aucs(y, b, codes)[0], weights, seed, resamples, level)


def _gauc_delta_from(values_a, values_b, weights, seed, resamples, level) -> tuple[float, float, float]:
    delta = _weighted_mean(values_b, weights) - _weighted_mean(values_a, weights)
    return (delta, *bootstrap_ci(values_b - values_a, seed, resamples, level, weights))


def _normal_ci(value: float, se: float, level: float, low: float, high: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise ValueError(f"level={level} must lie strictly between 0 and 1")
    if not math.isfinite(se):
        return math.nan, math.nan
    half = NormalDist().inv_cdf((1 + level) / 2) * se
    return float(min(max(value - half, low), high)), float(min(max(value + half, low), high))


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _entry(value: float, ci: tuple[float, float]) -> dict:
    return {"value": _finite(value), "ci": [_finite(ci[0]), _finite(ci[1])]}


def _lift(base: float, model: float, delta_ci: tuple[float, float, float]) -> dict:
    delta, lo, hi = delta_ci
    return {"base": _finite(base), "model": _finite(model), "delta": _finite(delta), "ci": [_finite(lo), _finite(hi)]}


def _intervals(seed: int, resamples: int) -> dict:
    return {"level": CI_LEVEL, "auc": "DeLong normal", "logloss": "normal, per-row losses",
            "gauc": "percentile bootstrap over groups", "resamples": resamples, "seed": seed}
