"""Search speed of the project's VectorIndex against a direct faiss call on an identical faiss index.

For each catalogue size: seeded clustered float32 vectors (L2-normalised) and held-out queries
from the same clusters. For the exact kind (IndexFlatIP) and the approximate one (HNSW, the
project's parameters), the project's `VectorIndex.search` (raw queries in, string ids out) is
timed in the same run, on the same queries, against a direct faiss call on the very faiss index
under it (normalised queries in, positions out), then against a faiss index built directly with
faiss from the same vectors and parameters; calls alternate in rounds, the order swapping.

Each row reports queries/s (best call), recall@10 against exact search, and the overhead: the
median over rounds of project time / faiss time, minus 1 (target: at most 5%). The direct call
on the same faiss object isolates the project's own work: two separately built but identical
indexes differ by several percent on a busy machine (memory placement), which would swamp it.
`vs_faiss_built` is the same ratio against the separately built index, with its recall beside.
Prints one JSON object per line; the last line is the headline.

    python benchmarks/search.py                           # 100k and 1M items (1M HNSW builds take minutes)
    python benchmarks/search.py --sizes 100000 --queries 500
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import faiss
import numpy as np

from moon.store import index as store_index
from moon.store.index import VectorIndex

TARGET_OVERHEAD = 0.05
K = 10


def clustered(n: int, centres: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """n unit vectors scattered around random `centres`, drawn in chunks to bound memory."""
    out = np.empty((n, centres.shape[1]), np.float32)
    for start in range(0, n, 100_000):
        rows = min(100_000, n - start)
        x = centres[rng.integers(0, len(centres), rows)]
        x += noise / np.sqrt(centres.shape[1]) * rng.standard_normal((rows, centres.shape[1]), dtype=np.float32)
        out[start:start + rows] = x
    faiss.normalize_L2(out)
    return out


def direct_faiss(kind: str, vectors: np.ndarray, params: dict) -> faiss.Index:
    """The same index built with faiss alone, from the parameters the project recorded."""
    dim = vectors.shape[1]
    if kind == "exact":
        index = faiss.IndexFlatIP(dim)
    else:
        index = faiss.IndexHNSWFlat(dim, params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["ef_construction"]
    index.add(vectors)
    if kind == "hnsw":
        index.hnsw.efSearch = params["ef_search"]
    return index


def timings(calls: dict[str, Callable[[], object]], repeats: int, min_time: float) -> dict[str, list[float]]:
    """Wall times of two calls in rounds, the order swapping every round (a b, b a, a b...), so both
    meet the same machine load and the same cache left by the call before. At least `repeats` rounds,
    more until each side has run `min_time` seconds (fast calls are noisy)."""
    for call in calls.values():
        call()  # warm-up: page in the index, start the thread pool
    sides = list(calls)
    times: dict[str, list[float]] = {side: [] for side in sides}
    rounds = 0
    while rounds < repeats or min(sum(t) for t in times.values()) < min_time:
        for side in sides if rounds % 2 == 0 else sides[::-1]:
            start = time.perf_counter()
            calls[side]()
            times[side].append(time.perf_counter() - start)
        rounds += 1
    return times


def paired_overhead(times: list[float], reference: list[float]) -> float:
    """Median over rounds of time / reference time, minus 1: load that drifts between rounds cancels."""
    return float(np.median(np.array(times) / np.array(reference)) - 1)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's exact top K among its found top K."""
    return float((found[:, :, None] == truth[:, None, :]).any(axis=2).sum(axis=1).mean() / truth.shape[1])


def measure(size: int, args: argparse.Namespace) -> list[dict]:
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((max(10, size // 1000), args.dim), dtype=np.float32)
    vectors = clustered(size, centres, args.noise, rng)
    queries = clustered(args.queries, centres, args.noise, rng)
    ids = np.array([f"item-{i}" for i in range(size)])
    _, truth = faiss.knn(queries, vectors, K, metric=faiss.METRIC_INNER_PRODUCT)
    return [measure_kind(kind, vectors, ids, queries, truth, args) for kind in ("exact", "hnsw")]


def measure_kind(kind: str, vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, truth: np.ndarray,
                 args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    project = VectorIndex.build(vectors, ids, kind=kind, seed=args.seed)
    project_build = time.perf_counter() - start
    start = time.perf_counter()
    built = direct_faiss(kind, vectors, project.params)
    faiss_build = time.perf_counter() - start
    same = project.faiss_index

    def ours():
        return project.search(queries, K)

    times = timings({"project": ours, "faiss": lambda: same.search(queries, K)}, args.repeats, args.min_time)
    against_built = timings({"project": ours, "faiss_built": lambda: built.search(queries, K)},
                            args.repeats, args.min_time)
    _, project_ids = project.search(queries, K)
    _, built_positions = built.search(queries, K)
    row = {
        "size": len(vectors), "kind": kind, "dim": args.dim, "queries": args.queries, "params": project.params,
        "build_s": {"project": round(project_build, 2), "faiss": round(faiss_build, 2)},
        "rounds": len(times["project"]),
        "project_qps": round(args.queries / min(times["project"]), 1),
        "faiss_qps": round(args.queries / min(times["faiss"]), 1),
        "faiss_built_qps": round(args.queries / min(against_built["faiss_built"]), 1),
        f"project_recall@{K}": round(recall(project_ids, ids[truth]), 4),
        f"faiss_built_recall@{K}": round(recall(built_positions, truth), 4),
        "overhead": round(paired_overhead(times["project"], times["faiss"]), 4),
        "overhead_best": round(min(times["project"]) / min(times["faiss"]) - 1, 4),
        "vs_faiss_built": round(paired_overhead(against_built["project"], against_built["faiss_built"]), 4),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (one call per side each), at least")
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds of timed calls per side, at least")
    parser.add_argument("--noise", type=float, default=0.6, help="spread of each cluster (relative to unit centres)")
    parser.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads; 0: faiss's default")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    print(json.dumps({"faiss_version": faiss.__version__, "threads": faiss.omp_get_max_threads(),
                      "exact_up_to": store_index.EXACT_UP_TO, "hnsw_up_to": store_index.HNSW_UP_TO}))
    rows = [row for size in args.sizes for row in measure(size, args)]
    worst = max(rows, key=lambda row: row["overhead"])
    print(json.dumps({
        "max_overhead": worst["overhead"],
        "at": f"{worst['kind']} {worst['size']}",
        "target": f"at most {TARGET_OVERHEAD:.0%}",
        "met": worst["overhead"] <= TARGET_OVERHEAD,
    }))


if __name__ == "__main__":
    main()
