"""The service behind `moon serve`: the serving model, the current state, and what requests do.

`Service` owns the serving model (`moon.load`, the Python API: the same weights and encoding
as `moon embed`), the micro-batcher every embedding goes through, and the reference to the
current `ServingState`. Handlers read `service.state` once and pass that object to every call
they make (`embed`, `search`, `lookup`), so a request is answered wholly by one version.

Writes are serialised: `reload` and `add_items` hold one lock while they build the next state
and swap it in; a second reload while one runs is refused at once (409), an item add waits for
it. A reload that fails leaves the current state serving and says why.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import moon
from moon import ui
from moon.api import MoonModel
from moon.config import ServeConfig
from moon.errors import UserError
from moon.model.inputs import Input
from moon.run import MODEL_STAGES
from moon.serve.batching import MicroBatcher, QueueFull
from moon.serve.limits import RequestError, unusable
from moon.serve.metrics import Metrics
from moon.serve.realtime import (
    append_served,
    category_paths,
    checked_rows,
    item_inputs,
    refuse_held,
    served_ids,
    served_rows,
)
from moon.serve.state import Hit, ServingState, load_state, self_test
from moon.store.versions import NAME, Store, StoreVersion, checkpoint_digest
from moon.vectors import prefix

EMBED_TIMEOUT_S = 120.0  # a request waiting longer for the model is answered 503
PROBE_TEXT = "self-test query"  # encoded by the serving model when a version it made is loaded


@dataclass(frozen=True)
class SearchQuery:
    """One search: exactly one of text, image (model inputs), vector or item_id."""

    kind: str
    value: object


class Service:
    def __init__(self, limits: ServeConfig, run_dir: Path, model: MoonModel, engine=None):
        self.limits = limits
        self.run_dir = Path(run_dir)
        self.model = model
        self.digest = checkpoint_digest(model.path)
        self.engine = engine  # None: the state's own faiss indexes; else e.g. `MilvusEngine`
        self.metrics = Metrics()
        self.batcher = MicroBatcher(self._encode, limits.batch_size, limits.batch_wait_ms / 1000, limits.queue_size,
                                    on_queue=self.metrics.queue.set, on_batch=self.metrics.batches.observe)
        self.state: ServingState | None = None
        self._reloading = threading.Lock()  # one reload at a time; a second is refused
        self._writing = threading.Lock()  # reloads and item adds build the next state one at a time
        self._stop = threading.Event()

    @classmethod
    def start(cls, limits: ServeConfig, run_dir: Path, model: str | None = None, version: str | None = None,
              engine=None, device: str | None = None) -> Service:
        """Loads the serving model and the version to serve (default: the newest it made); a version that
        does not load or fails its self-test stops the start with a UserError."""
        service = cls(limits, run_dir, open_model(Path(run_dir), model, device), engine)
        try:
            service._swap(service.load(version))
        except UserError:
            service.close()
            raise
        except Exception as exc:  # a version whose files cannot be read: say which, without a traceback
            service.close()
            raise UserError(f"store version {version or 'newest of the serving model'} could not be loaded "
                            f"({type(exc).__name__}: {exc}): run `moon embed` and `moon index` again, or pass "
                            "--version with another one") from None
        return service

    def close(self) -> None:
        self._stop.set()
        self.batcher.close()
        if self.engine is not None:
            self.engine.close()

    # ------------------------------------------------------------ embedding

    def _encode(self, inputs: Sequence[Input]) -> np.ndarray:
        """Full-dimension vectors in batches of at most batch_size, each one forward pass in this thread
        (no input worker processes: a request must not pay for their start)."""
        size = self.limits.batch_size
        chunks = [self.model.embedder.encode(inputs[start:start + size], batch_size=size)
                  for start in range(0, len(inputs), size)]
        return np.concatenate(chunks)

    def embed(self, inputs: Sequence[Input], dim: int | None = None, bounded: bool = True) -> np.ndarray:
        """Vectors of model inputs at a dimension of the model; 429 when the queue is full."""
        dim = self.model.check_dim(dim)
        try:
            future = self.batcher.submit(inputs, bounded)
        except QueueFull as full:
            raise RequestError(429, str(full)) from None
        try:
            return prefix(future.result(EMBED_TIMEOUT_S), dim)
        except TimeoutError:
            raise RequestError(503, f"the model did not answer within {EMBED_TIMEOUT_S:.0f}s; retry later") from None

    # ------------------------------------------------------------ search and lookup

    def search(self, state: ServingState, query: SearchQuery, k: int, dim: int | None,
               category: str | None) -> tuple[str, int, list[Hit]]:
        """(version that answered, dim, hits best first)."""
        if isinstance(k, bool) or not 1 <= k <= self.limits.max_k:
            raise unusable(f"k={k} must lie in 1..{self.limits.max_k} (serve.max_k)")
        dim = state.check_dim(dim)
        leave_out = query.value if query.kind == "item_id" else None
        vector = self.query_vector(state, query, dim)
        if self.engine is not None:
            return self.engine.search(vector, k, dim, state, category, leave_out)
        return state.version, dim, state.search(vector, k, dim, category, leave_out)[0]

    def query_vector(self, state: ServingState, query: SearchQuery, dim: int) -> np.ndarray:
        """The (1, dim) unit vector a query is searched with."""
        if query.kind == "item_id":
            found, _, vectors = state.vectors([query.value], dim)
            if not found:
                raise RequestError(404, f"item {query.value!r} is not in store version {state.version} "
                                   f"({state.count:,} items)")
            return vectors
        if query.kind == "vector":
            return checked_vector(query.value, dim, state.version)
        if not state.made_by_serving_model:
            raise RequestError(409, f"store version {state.version} was made by {state.model}, not by the serving "
                               f"model {self.model.label}: a {query.kind} query encoded by the serving model does "
                               "not compare with its vectors; search by vector or item_id, or reload a version the "
                               "serving model made")
        return self.embed([query.value], dim)

    def lookup(self, state: ServingState, ids: Sequence[str], dim: int | None) -> tuple[int, list, list, np.ndarray]:
        """(dim, found ids, missing ids, vectors of the found): the stored representation."""
        dim = state.check_dim(dim)
        return (dim, *state.vectors(ids, dim))

    # ------------------------------------------------------------ versions

    def versions(self) -> list[dict]:
        """Every finished version of the store, with who made it and whether it is served."""
        store = Store(self.run_dir)
        active = self.state.version if self.state else None
        return [describe(store.open(name), self.digest, active) for name in store.versions()]

    def load(self, version: str | None) -> ServingState:
        """A new state for `version` (default: the newest version the serving model made), self-tested;
        items added through the service that a version of the serving model lacks are added first."""
        stored = self.model.store_version(version)
        if stored.manifest.get("checkpoint_digest") == self.digest:
            stored = self._catch_up(stored)
        state = load_state(self.run_dir, stored, self.digest, category_paths(self.run_dir))
        probe = self.embed([Input(PROBE_TEXT)], bounded=False)[0] if state.made_by_serving_model else None
        self_test(state, probe)
        return state

    def _catch_up(self, stored: StoreVersion) -> StoreVersion:
        """Adds to `stored` the items added through the service that it lacks (see `realtime`)."""
        lacking = [item_id for item_id in dict.fromkeys(served_ids(self.run_dir)) if stored.rows([item_id])[0] < 0]
        if not lacking:
            return stored
        rows = served_rows(self.run_dir, lacking)
        vectors = self.embed(item_inputs(rows, stored.manifest.get("item_view") or self.model.item_view),
                             bounded=False)
        added = StoreVersion(stored.path).add(lacking, vectors)
        ui.log(f"added {added} item(s) added through the service earlier to store version {stored.name}")
        return StoreVersion(stored.path)

    def reload(self, version: str | None) -> dict:
        """Loads `version` beside the current one and swaps it in once it passed its self-test."""
        if not self._reloading.acquire(blocking=False):
            raise RequestError(409, "a reload is already running: wait for it to finish, then try again")
        try:
            with self._writing:
                return self._reload(version)
        finally:
            self._reloading.release()

    def _reload(self, version: str | None) -> dict:
        previous, started = self.state, time.perf_counter()
        if version is not None and version not in Store(self.run_dir).versions():
            self.metrics.reloads.labels("failed").inc()
            finished = ", ".join(Store(self.run_dir).versions())
            raise RequestError(404, f"store version {version!r} is not a finished version of this run "
                               f"(finished: {finished}); {previous.version} keeps serving")
        try:
            state = self.load(version)
        except Exception as exc:
            self.metrics.reloads.labels("failed").inc()
            status = exc.status if isinstance(exc, RequestError) else 422
            raise RequestError(status, f"store version {version or 'newest of the serving model'} could not be "
                               f"loaded ({type(exc).__name__}: {exc}); {previous.version} keeps serving") from None
        seconds = time.perf_counter() - started
        self.metrics.reloads.labels("ok").inc()
        self.metrics.reload_seconds.observe(seconds)
        self._swap(state)
        ui.log(f"now serving {state.version} (was {previous.version}), loaded in {seconds:.2f}s")
        return {"version": state.version, "previous": previous.version, "seconds": round(seconds, 3),
                "items": state.count, "base_items": state.base_items, "delta_items": state.delta_items}

    def _swap(self, state: ServingState) -> None:
        """The one assignment every later request sees; requests holding the old state finish on it."""
        self.state = state
        self.metrics.now_serving(state.version, state.model, state.base_items, state.delta_items)

    def watch(self, interval: float) -> threading.Thread:
        """Looks at the store every `interval` seconds and reloads when the serving model made a newer
        version than the one served (a version that failed to load is not tried again)."""
        def loop() -> None:
            failed: set[str] = set()
            while not self._stop.wait(interval):
                newer = self.newer_version()
                if newer is None or newer in failed:
                    continue
                try:
                    self.reload(newer)
                except RequestError as refused:
                    if refused.status != 409:  # 409: a reload asked for by a client is running
                        failed.add(newer)
                        ui.log(f"watch: {refused}")

        thread = threading.Thread(target=loop, name="moon-store-watch", daemon=True)
        thread.start()
        return thread

    def newer_version(self) -> str | None:
        made = Store(self.run_dir).made_by(self.model.path)
        if made is None or self.state is None or number(made) <= number(self.state.version):
            return None
        return made

    # ------------------------------------------------------------ real-time items

    def add_items(self, items: Sequence[Mapping]) -> dict:
        """Embeds new items with the serving model, keeps them (see `realtime`) and makes them searchable."""
        rows, pixels = checked_rows(items, self.limits)
        ids = rows["item_id"].to_pylist()
        with self._writing:
            state = self.state
            self._refuse_adds(state, ids)
            vectors = self.embed(item_inputs(rows, state.manifest.get("item_view") or self.model.item_view, pixels))
            append_served(self.run_dir, rows)
            StoreVersion(Store(self.run_dir).path(state.version)).add(ids, vectors)
            paths = dict(zip(ids, map(tuple, rows["category"].to_pylist())))
            grown = state.with_items(ids, vectors, paths)
            self._swap(grown)
        self.metrics.added_items.inc(len(ids))
        return {"version": grown.version, "added": ids, "items": grown.count, "delta_items": grown.delta_items}

    def _refuse_adds(self, state: ServingState, ids: list[str]) -> None:
        if self.engine is not None:
            raise RequestError(409, f"searches go to {self.engine.name}, which the service does not write to: add "
                               "items to the store (`moon embed --incremental`) and export the version again")
        if not state.made_by_serving_model:
            raise RequestError(409, f"store version {state.version} was made by {state.model}, not by the serving "
                               f"model {self.model.label}: new items can only join a version the serving model made; "
                               "reload one first")
        refuse_held(ids, state.holds, state.version)


def open_model(run_dir: Path, model: str | None, device: str | None) -> MoonModel:
    """The serving model: a stage of the run (default: its latest trained one) or a model directory."""
    if model is None or model in MODEL_STAGES:
        return moon.load(run_dir, stage=model, device=device)
    if not Path(model).is_dir():
        raise UserError(f"--model {model} is neither a stage ({', '.join(MODEL_STAGES)}) nor a model directory")
    return moon.load(model, run_dir=run_dir, device=device)


def checked_vector(vector: Sequence[float], dim: int, version: str) -> np.ndarray:
    """A client's query vector as a (1, dim) unit row: its Matryoshka prefix, re-normalised."""
    x = np.asarray(vector, dtype=np.float64)
    if x.ndim != 1 or x.shape[0] < dim:
        raise unusable(f"the vector has {x.shape[0]} dims, but store version {version} is searched at dim={dim}: "
                       f"pass dim={x.shape[0]} if the version serves it, or a vector of at least {dim} dims")
    try:
        return prefix(x[None, :dim], dim)
    except ValueError as exc:
        raise unusable(f"the vector cannot be searched: {exc}") from None


def describe(stored: StoreVersion, serving_digest: str, active: str | None) -> dict:
    manifest = stored.manifest
    return {"name": stored.name, "model": manifest.get("model"), "items": len(stored), "dim": stored.dim,
            "dims": sorted({*stored.matryoshka_dims, stored.dim}), "created_at": manifest.get("created_at"),
            "updated_at": manifest.get("updated_at"),
            "made_by_serving_model": manifest.get("checkpoint_digest") == serving_digest,
            "active": stored.name == active}


def number(version: str) -> int:
    """N of a version named v<N>-<label>: versions are numbered in the order they were begun."""
    return int(NAME.match(version).group(1))
