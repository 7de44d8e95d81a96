"""What the HTTP service costs over the same work in process: search, embedding, and a version switch.

In one run, over a fresh temporary run directory (the tiny simulated world, an untrained model of
`--dim` dims published as stage 2, its real store version v1 of the tiny catalogue, and synthetic
versions of random clustered vectors that the same weights are recorded as making):

  (a) faiss search in process: the saved index of a synthetic version of `--items` items (`moon
      index`, as the service loads it), one query per call, k=10, from 1, 4 and 8 threads: queries/s
      and p50/p99 latency;
  (b) the same queries through `moon serve` on 127.0.0.1 (`POST /v1/search {"vector", "k"}`), one
      keep-alive connection per thread: the same figures, and HTTP / in-process ratios;
  (c) embedding texts in process (`moon.load(run).encode`) against `POST /v1/embed
      {"inputs": [{"text"}, ...]}`, in batches of `--embed-batch` texts: texts/s and the ratio;
  (d) a version switch: `POST /v1/admin/reload` to a synthetic version of `--switch-items` items
      (its exact index saved beforehand, as `moon index` leaves it) against a bare read of that
      version's shards into float32 vectors (`StoreVersion.vectors()`, best of two reads).

Parts (b)-(d) start `python -m moon serve --run-dir DIR --port P` as a subprocess (admin key from
MOON_ADMIN_KEY, set here); where this checkout has no `moon serve`, or it does not become ready,
they print why and are skipped, and the in-process figures still print. Traffic goes to loopback
only and each phase is bounded by `--queries` and `--phase-seconds`. faiss and torch use one thread
in both processes (OMP_NUM_THREADS=1), so the comparison is of the same work.

    python benchmarks/serve.py                           # 50k x 64 items, switch to a 50k version
    python benchmarks/serve.py --switch-items 1000000    # the version-switch time of a 1M-item version

Prints one JSON object per line; the last line is the headline: HTTP p50 latency / in-process p50
at concurrency 1 (or, without the service, in-process queries/s at 8 threads / at 1 thread).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
from search import clustered  # benchmarks/search.py, beside this file

from moon import ui
from moon.config import load_config
from moon.io.tables import read_table
from moon.model.embedder import Embedder
from moon.model.views import ItemViews
from moon.represent import embed_catalogue
from moon.run import RunDir
from moon.store.indexing import index_version, load_index
from moon.store.versions import Store, StoreVersion
from moon.train.loop import publish

K = 10
ADMIN_KEY = "benchmark-admin-key"
SHARD_ITEMS = 100_000  # rows per synthetic shard: memory holds one shard while writing
WORLD = ["world.items=240", "world.leaf_categories=12", "world.brands=15", "world.shops=6", "world.image_size=48",
         "world.chunk_items=100", "behaviour.users=40", "behaviour.days=6", "behaviour.sessions_per_user_day=1.5",
         "behaviour.photo_size=48", "name=serve-bench", "store.partitions=2"]


def model_overrides(dim: int) -> list[str]:
    """An untrained model small enough to load in a second, `dim` wide, with one Matryoshka prefix."""
    return [f"model.hidden_size={dim}", "model.heads=2", "model.kv_heads=1", "model.vision_dim=32",
            "model.vision_heads=2", "model.image_size=32", "model.vocab_size=512",
            f"model.matryoshka_dims=[{dim // 2}]"]


# ---------------------------------------------------------------- the run directory


def make_run(run_dir: Path, dim: int) -> StoreVersion:
    """The tiny world, an untrained model as stage 2 and its real store version of the catalogue."""
    from moon.sources.simulate.write import simulate

    config = load_config(None, [*WORLD, *model_overrides(dim)])
    simulate(config, run_dir)
    texts = ItemViews(read_table(run_dir, "items")).texts()
    embedder = Embedder.create(config.model, texts, seed=0)
    publish(embedder.save, RunDir(run_dir).model("stage2"), {"stage": "stage2"})
    return embed_catalogue(config, run_dir)


def synthetic_version(run_dir: Path, like: StoreVersion, name: str, items: int, seed: int) -> StoreVersion:
    """A version of `items` random clustered vectors, planned as `like` was (the same weights, dims and
    item view), so the service treats it as made by its model; saved with exact indexes at every dim."""
    plan = json.loads((like.path / "plan.json").read_text())
    for key in ("version", "queries", "queries_absent"):
        plan.pop(key, None)
    plan.update(items=items, partitions=max(1, math.ceil(items / SHARD_ITEMS)), items_digest=f"synthetic-{seed}",
                events_digest=None, queries_absent="synthetic vectors")
    builder = Store(run_dir).begin(plan, name=name)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(10, items // 1000), like.dim), dtype=np.float32)
    for partition in range(plan["partitions"]):
        start, stop = builder.bounds(partition)
        ids = [f"syn{seed}-{i:08d}" for i in range(start, stop)]
        builder.write(partition, ids, clustered(stop - start, centres, 0.6, rng))
    stored = builder.finish(synthetic=True)
    index_version(run_dir, name, kind="exact", per_dim=True)
    return stored


# ---------------------------------------------------------------- timing


def latencies(call: Callable[[object, int], None], threads: int, count: int, seconds: float,
              make_worker_state: Callable[[], object] = lambda: None) -> dict:
    """Runs `call(state, i)` for i in 0..count-1 from `threads` threads (each with its own state, e.g. a
    connection), stopping early after `seconds`; returns calls/s, p50 and p99 latency, errors."""
    taken: list[float] = []
    errors: list[str] = []
    next_index = iter(range(count))
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker():
        state = make_worker_state()
        mine = []
        while time.monotonic() < deadline:
            with lock:
                i = next(next_index, None)
            if i is None:
                break
            start = time.perf_counter()
            try:
                call(state, i)
            except Exception as exc:  # counted, not fatal: a benchmark reports failed calls
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            mine.append(time.perf_counter() - start)
        with lock:
            taken.extend(mine)
        close = getattr(state, "close", None)
        if close:
            close()

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    started = time.perf_counter()
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    wall = time.perf_counter() - started
    ms = np.array(taken) * 1000 if taken else np.array([np.nan])
    return {"threads": threads, "calls": len(taken), "per_s": round(len(taken) / wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "errors": len(errors), "first_error": errors[0] if errors else None}


# ---------------------------------------------------------------- the service


class Server:
    """`moon serve` in a subprocess on 127.0.0.1, stopped (by its own pid) when the benchmark ends."""

    def __init__(self, run_dir: Path, log: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "MOON_ADMIN_KEY": ADMIN_KEY, "OMP_NUM_THREADS": "1"}
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moon", "serve", "--run-dir", str(run_dir), "--port", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float) -> str | None:
        """None once GET /readyz answers 200; else why not."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return f"`moon serve` exited with status {self.process.returncode}: {self.tail()}"
            try:
                if httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    return None
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        return f"`moon serve` was not ready within {timeout:.0f}s: {self.tail()}"

    def tail(self) -> str:
        return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-5:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_available() -> str | None:
    """None when this checkout has `moon serve`; else why not."""
    found = subprocess.run([sys.executable, "-m", "moon", "serve", "--help"], capture_output=True, text=True,
                           check=False)
    if found.returncode != 0:
        return f"this checkout has no `moon serve` ({(found.stderr or found.stdout).strip().splitlines()[-1]})"
    return None


def http_client(base: str):
    import httpx

    return lambda: httpx.Client(base_url=base, timeout=30)


def ratio(over: float, under: float) -> float | None:
    """over / under, None where either side measured nothing (every call failed)."""
    if not (np.isfinite(over) and np.isfinite(under)) or over <= 0 or under <= 0:
        return None
    return round(over / under, 2)


def posted(client, path: str, body: dict, headers: dict | None = None) -> dict:
    response = client.post(path, json=body, headers=headers or {})
    if response.status_code != 200:
        raise RuntimeError(f"{path} answered {response.status_code}: {response.text[:200]}")
    return response.json()


# ---------------------------------------------------------------- the parts


def search_in_process(run_dir: Path, version: str, queries: np.ndarray, args) -> list[dict]:
    index = load_index(run_dir, version)
    rows = []
    for threads in args.concurrency:
        row = latencies(lambda _, i: index.search(queries[i:i + 1], K), threads, len(queries), args.phase_seconds)
        rows.append({"part": "search", "where": "in_process", "items": index.size, "kind": index.kind, **row})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def search_over_http(server: Server, queries: np.ndarray, inproc: list[dict], args) -> list[dict]:
    vectors = queries.tolist()
    rows = []
    for threads, baseline in zip(args.concurrency, inproc):
        row = latencies(lambda client, i: posted(client, "/v1/search", {"vector": vectors[i], "k": K}),
                        threads, len(queries), args.phase_seconds, http_client(server.base))
        rows.append({"part": "search", "where": "http", **row,
                     "p50_ratio": ratio(row["p50_ms"], baseline["p50_ms"]),
                     "p99_ratio": ratio(row["p99_ms"], baseline["p99_ms"]),
                     "throughput_ratio": ratio(baseline["per_s"], row["per_s"])})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def embed_batches(run_dir: Path, args) -> list[list[str]]:
    texts = ItemViews(read_table(run_dir, "items")).texts()
    batches = [texts[i:i + args.embed_batch] for i in range(0, len(texts), args.embed_batch)]
    return (batches * math.ceil(args.embed_requests / len(batches)))[:args.embed_requests]


def embed_in_process(run_dir: Path, batches: list[list[str]], args) -> dict:
    import moon

    model = moon.load(run_dir)
    model.encode(batches[0])  # warm-up: first forward pass
    row = latencies(lambda _, i: model.encode(batches[i]), 1, len(batches), args.phase_seconds)
    row = {"part": "embed", "where": "in_process", "texts_per_s": round(row["per_s"] * args.embed_batch, 1), **row}
    print(json.dumps(row), flush=True)
    return row


def embed_over_http(server: Server, batches: list[list[str]], baseline: dict, args) -> list[dict]:
    bodies = [{"inputs": [{"text": text} for text in batch]} for batch in batches]
    rows = []
    for threads in (1, 4):
        row = latencies(lambda client, i: posted(client, "/v1/embed", bodies[i]), threads, len(batches),
                        args.phase_seconds, http_client(server.base))
        texts_per_s = row["per_s"] * args.embed_batch
        rows.append({"part": "embed", "where": "http", "texts_per_s": round(texts_per_s, 1), **row,
                     "throughput_ratio": ratio(baseline["texts_per_s"], texts_per_s)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bare_read_seconds(stored: StoreVersion) -> float:
    """Seconds to read a version's shards into float32 vectors and ids, from a fresh reader."""
    start = time.perf_counter()
    fresh = StoreVersion(stored.path)
    fresh.vectors()
    fresh.item_ids()
    return time.perf_counter() - start


def switch(server: Server | None, stored: StoreVersion, probe: np.ndarray) -> dict:
    """A reload to `stored` against a bare read of its shards (best of one read before and one after)."""
    reads = [bare_read_seconds(stored)]
    row: dict = {"part": "switch", "items": len(stored), "dim": stored.dim}
    if server is not None:
        import httpx

        with httpx.Client(base_url=server.base, timeout=600) as client:
            start = time.perf_counter()
            posted(client, "/v1/admin/reload", {"version": stored.name},
                   headers={"Authorization": f"Bearer {ADMIN_KEY}"})
            row["reload_s"] = round(time.perf_counter() - start, 3)
            row["serving_after"] = posted(client, "/v1/search", {"vector": probe.tolist(), "k": K}).get("version")
    reads.append(bare_read_seconds(stored))
    row["bare_read_s"] = round(min(reads), 3)
    if "reload_s" in row:
        row["reload_over_bare_read"] = ratio(row["reload_s"], row["bare_read_s"])
    print(json.dumps(row), flush=True)
    return row


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=50_000, help="items of the version searched in (a) and (b)")
    parser.add_argument("--dim", type=int, default=64, help="vector width (the untrained model's hidden size)")
    parser.add_argument("--switch-items", type=int, default=50_000, help="items of the version switched to in (d)")
    parser.add_argument("--queries", type=int, default=2000, help="search calls per concurrency, at most")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8], help="client threads")
    parser.add_argument("--embed-batch", type=int, default=16, help="texts per embedding call")
    parser.add_argument("--embed-requests", type=int, default=60, help="embedding calls per phase, at most")
    parser.add_argument("--phase-seconds", type=float, default=20.0, help="each timed phase stops after this")
    parser.add_argument("--start-timeout", type=float, default=180.0, help="seconds `moon serve` has to be ready")
    parser.add_argument("--no-http", action="store_true", help="in-process parts only")
    parser.add_argument("--keep", help="make the run directory here and keep it (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    ui.set_quiet(True)
    faiss.omp_set_num_threads(1)  # as OMP_NUM_THREADS=1 sets it in the service
    import torch

    torch.set_num_threads(1)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="moon-serve-bench-"))
    run_dir = root / "run"
    server = None
    try:
        started = time.perf_counter()
        real = make_run(run_dir, args.dim)
        # the switch target is the older version, so the service's default (the newest its model made)
        # is the searched one, and the switch is an explicit reload
        target = synthetic_version(run_dir, real, "v2-switch", args.switch_items, args.seed + 2)
        searched = synthetic_version(run_dir, real, "v3-search", args.items, args.seed + 3)
        print(json.dumps({"setup_s": round(time.perf_counter() - started, 1), "run_dir": str(run_dir),
                          "faiss_threads": faiss.omp_get_max_threads(), "torch_threads": torch.get_num_threads(),
                          "versions": {v.name: len(v) for v in (real, target, searched)}}), flush=True)
        rng = np.random.default_rng(args.seed)
        centres = rng.standard_normal((max(10, args.items // 1000), args.dim), dtype=np.float32)
        queries = clustered(args.queries, centres, 0.6, rng)

        inproc = search_in_process(run_dir, searched.name, queries, args)
        batches = embed_batches(run_dir, args)
        embedded = embed_in_process(run_dir, batches, args)

        why_not = "--no-http was given" if args.no_http else serve_available()
        if why_not is None:
            server = Server(run_dir, root / "serve.log")
            why_not = server.wait_ready(args.start_timeout)
        if why_not is not None:
            print(json.dumps({"part": "http", "skipped": why_not}), flush=True)
            switch(None, target, queries[0])
            scaling = inproc[-1]["per_s"] / inproc[0]["per_s"]
            print(json.dumps({"headline": f"in-process faiss queries/s, {inproc[-1]['threads']} threads over 1",
                              "ratio": round(scaling, 2), "http": "skipped"}))
            return

        http = search_over_http(server, queries, inproc, args)
        embed_over_http(server, batches, embedded, args)
        switched = switch(server, target, queries[0])
        print(json.dumps({"headline": "HTTP search p50 latency / in-process p50, 1 client thread",
                          "ratio": http[0]["p50_ratio"], "p99_ratio": http[0]["p99_ratio"],
                          "reload_over_bare_read": switched.get("reload_over_bare_read")}))
    finally:
        if server is not None:
            server.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
