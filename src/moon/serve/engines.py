"""Where `/v1/search` looks when it does not use the served version's own faiss indexes.

`--engine faiss` (the default) searches the state's indexes; nothing here is used. `--engine
milvus` sends every search to a Milvus collection behind an alias (`moon export --to milvus`),
through `moon.store.milvus.MilvusSearcher`, imported only when chosen. The searcher resolves
the alias once per call, so a search is answered by one collection, and the response names the
store version that collection was exported from. Lookups, embeddings and the query vectors of
item-id searches still come from the version the service loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from moon.errors import UserError
from moon.serve.limits import RequestError
from moon.serve.state import Hit, ServingState
from moon.store.versions import Store

ENGINES = ("faiss", "milvus")


def open_engine(engine: str, run_dir: Path, uri: str | None = None, alias: str | None = None):
    """None for faiss (the state's own indexes), else the engine searches go to."""
    if engine == "faiss":
        return None
    if engine != "milvus":
        raise UserError(f"--engine {engine} is not an engine: use one of {', '.join(ENGINES)}")
    if not uri:
        raise UserError("--engine milvus needs --milvus-uri: a Milvus Lite folder (a path ending in .db) or a "
                        "server's http://host:19530, as given to `moon export --to milvus`")
    try:
        from moon.store.milvus import DEFAULT_ALIAS, MilvusSearcher, collection_name
    except ImportError as exc:
        raise UserError(f"--engine milvus needs moon.store.milvus and pymilvus, which cannot be imported here "
                        f"({exc}): install pymilvus (and milvus-lite for a local .db), or use --engine faiss") from None
    return MilvusEngine(MilvusSearcher(uri, alias or DEFAULT_ALIAS), run_dir, collection_name)


class MilvusEngine:
    name = "Milvus"

    def __init__(self, searcher, run_dir: Path, collection_name: Callable[..., str]):
        self.searcher = searcher
        self.run_dir = run_dir
        self._collection_name = collection_name  # moon.store.milvus's naming, imported only with the engine
        self._versions: dict[str, str] = {}

    def search(self, vector: np.ndarray, k: int, dim: int, state: ServingState, category: str | None,
               leave_out: str | None) -> tuple[str, int, list[Hit]]:
        """(collection's store version, dim, hits); `category` filters by leaf, as the export records it."""
        if dim != state.dim:
            raise RequestError(422, f"Milvus holds the exported dimension ({state.dim}): leave dim out or pass "
                               f"dim={state.dim}")
        try:
            ids, scores, collection = self.searcher.search(vector, k + (leave_out is not None), leaf=category)
        except UserError as exc:
            raise RequestError(503, f"Milvus could not answer: {exc}") from None
        hits = [Hit(item_id, float(score)) for item_id, score in zip(ids[0], scores[0]) if item_id != leave_out]
        return self.version_of(collection), dim, hits[:k]

    def version_of(self, collection: str) -> str:
        """The store version a collection was exported from (by the export's naming), else its name."""
        if collection not in self._versions:
            names = {self._collection_name(self.searcher.alias, name, 1, 1): name
                     for name in Store(self.run_dir).versions()}
            self._versions.update(names)
        return self._versions.get(collection, collection)

    def close(self) -> None:
        self.searcher.close()
