"""`moon index`: the saved vector index of a representation store version, kept up to date.

Layout, inside the run directory:

    index/
      v1-stage2/                  one folder per store version
        full/                     `VectorIndex.save` of the full-dimension vectors
        dim-64/                   one per Matryoshka prefix (`moon index --per-dim`)
        manifest.json             which store version it indexes, and what each folder holds

**Incremental.** A store version only ever gains items (`moon embed --incremental`), so when a
saved index exists, the items the version holds and the index lacks are added to it
(`VectorIndex.add`) and it is saved again, each folder by rename: a reader never sees half an
index. Nothing new: the index is current. The kind chosen at build time is kept; asking for
another kind (or `rebuild`) builds from scratch.

**Identity.** The manifest records the store version's checkpoint digest and creation time. A
version folder that was deleted and made again under the same name holds other vectors, so its
old index is rebuilt rather than extended.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moon import ui
from moon.errors import UserError
from moon.io.atomic import atomic_json
from moon.io.tables import MANIFEST, utc_now
from moon.run import RunDir
from moon.store.index import KINDS, META_FILE, Kind, VectorIndex, ann_recall
from moon.store.versions import Store, StoreVersion

FULL = "full"
RECALL_SAMPLE = 1000  # queries drawn from the indexed vectors to measure an approximate index
RECALL_K = 10


@dataclass(frozen=True)
class IndexResult:
    """What `index_version` did to one index folder."""

    folder: str  # "full" or "dim-<d>"
    path: Path
    index: VectorIndex
    added: int | None  # items added to a saved index; None when built from scratch
    recall: float | None  # recall@10 against exact search (approximate kinds only)


def folder_name(dim: int, full_dim: int) -> str:
    return FULL if dim == full_dim else f"dim-{dim}"


def index_version(run_dir: Path, version: str | None = None, kind: Kind = "auto", per_dim: bool = False,
                  rebuild: bool = False, seed: int = 0) -> tuple[StoreVersion, list[IndexResult]]:
    """Builds, extends or confirms the indexes of a store version (default: the latest).

    Always the full dimension; with `per_dim` every Matryoshka dimension too; a per-dim index
    saved earlier is kept up to date even without `per_dim`, so no saved index falls behind.
    """
    if kind != "auto" and kind not in KINDS:
        raise UserError(f"--kind {kind} is not an index kind; use one of: auto, {', '.join(KINDS)}")
    store = Store(run_dir)
    stored = store.open(version) if version else store.latest()
    root = RunDir(run_dir).index(stored.name)
    rebuild = rebuild or not _same_source(root, stored)
    ids = np.asarray(stored.item_ids(), dtype=str)
    results = [_index_one(stored, ids, dim, root, kind, rebuild, seed) for dim in _dims(stored, root, per_dim)]
    atomic_json(root / MANIFEST, {
        "store_version": stored.name,
        "store_created_at": stored.manifest.get("created_at"),
        "checkpoint_digest": stored.manifest.get("checkpoint_digest"),
        "count": len(stored),
        "indexes": {r.folder: {"dim": r.index.dim, "kind": r.index.kind, "size": r.index.size,
                               "ann_recall@10": r.recall} for r in results},
        "updated_at": utc_now(),
    })
    return stored, results


def is_current(run_dir: Path, version: str) -> bool:
    """True when the saved index of store `version` holds every item the version holds (a cheap
    check of the manifests only, for the pipeline)."""
    root = RunDir(run_dir).index(version)
    try:
        stored = Store(run_dir).open(version)
    except UserError:
        return False
    if not (root / MANIFEST).is_file() or not _same_source(root, stored):
        return False
    indexes = json.loads((root / MANIFEST).read_text())["indexes"]
    return FULL in indexes and all((root / name / META_FILE).is_file() and entry["size"] == len(stored)
                                   for name, entry in indexes.items())


def load_index(run_dir: Path, version: str | None = None, dim: int | None = None, mmap: bool = False) -> VectorIndex:
    """The saved index of a store version (default: the latest) at `dim` (default: full); `mmap` maps it
    read-only (`VectorIndex.load`)."""
    store = Store(run_dir)
    stored = store.open(version) if version else store.latest()
    path = RunDir(run_dir).index(stored.name) / folder_name(dim or stored.dim, stored.dim)
    if not path.is_dir():
        flag = " --per-dim" if dim and dim != stored.dim else ""
        raise UserError(f"no saved index at {path}: run `moon index --version {stored.name}{flag}`")
    return VectorIndex.load(path, mmap=mmap)


def built_from(run_dir: Path, stored: StoreVersion) -> bool:
    """Whether the saved index of `stored` (if any) was built from this very store version, not from an
    earlier version of the same name: only then may its items be trusted to hold this version's vectors."""
    return _same_source(RunDir(run_dir).index(stored.name), stored)


def _dims(stored: StoreVersion, root: Path, per_dim: bool) -> list[int]:
    """Full width first, then the Matryoshka dims asked for or already saved, ascending."""
    prefixes = [d for d in stored.matryoshka_dims if d != stored.dim]
    return [stored.dim, *(d for d in sorted(prefixes) if per_dim or (root / f"dim-{d}").is_dir())]


def _same_source(root: Path, stored: StoreVersion) -> bool:
    """Whether the saved index (if any) was built from this very store version, not an earlier
    version of the same name. No manifest yet counts as the same: the folders' ids decide."""
    if not (root / MANIFEST).is_file():
        return True
    made_from = json.loads((root / MANIFEST).read_text())
    return (made_from.get("store_created_at"), made_from.get("checkpoint_digest")) == (
        stored.manifest.get("created_at"), stored.manifest.get("checkpoint_digest"))


def _index_one(stored: StoreVersion, ids: np.ndarray, dim: int, root: Path, kind: Kind, rebuild: bool,
               seed: int) -> IndexResult:
    name = folder_name(dim, stored.dim)
    path = root / name
    saved = None if rebuild or not (path / META_FILE).is_file() else VectorIndex.load(path)
    vectors = stored.vectors(dim)  # decoded once: for building or adding, and for the recall check
    if saved is not None and kind in ("auto", saved.kind) and np.isin(saved.ids, ids).all():
        added = _add_missing(saved, vectors, ids)
        if added:
            saved.save(path)
        return IndexResult(name, path, saved, added, _recall(saved, stored, vectors))
    index = VectorIndex.build(vectors, ids, kind, seed)
    index.save(path)
    return IndexResult(name, path, index, None, _recall(index, stored, vectors))


def _add_missing(index: VectorIndex, vectors: np.ndarray, ids: np.ndarray) -> int:
    """Adds the version's items that `index` lacks, in the version's order; returns how many."""
    new = np.flatnonzero(~np.isin(ids, index.ids))
    if new.size:
        index.add(vectors[new], ids[new])
    return int(new.size)


def _recall(index: VectorIndex, stored: StoreVersion, vectors: np.ndarray) -> float | None:
    """recall@10 of an approximate index against exact search on a sample of its own vectors."""
    if index.kind == "exact":
        return None
    return ann_recall(index, vectors[stored.rows(index.ids)], sample=RECALL_SAMPLE, k=RECALL_K)  # index order


def print_results(stored: StoreVersion, results: list[IndexResult]) -> None:
    """The command's output table: one row per index folder (shown under --quiet too)."""
    rows = [(r.folder, r.index.dim, r.index.kind, r.index.size, _action(r),
             "exact" if r.recall is None else f"{r.recall:.4f}") for r in results]
    ui.print_table(f"vector index of store version {stored.name}", rows,
                   ("index", "dim", "kind", "items", "this run", f"recall@{RECALL_K} vs exact"))


def summary(stored: StoreVersion, results: list[IndexResult]) -> str:
    """One line: which folders were built, how many items were added, or that the index is current."""
    built = [r.folder for r in results if r.added is None]
    added = max((r.added for r in results if r.added), default=0)
    done = ([f"built {', '.join(built)}"] if built else []) + ([f"added {added:,} new items"] if added else [])
    if not done:
        return f"the index of store version {stored.name} is current: it holds all {len(stored):,} items"
    return (f"index of store version {stored.name} ({len(stored):,} items): {'; '.join(done)} "
            f"-> {results[0].path.parent}")


def _action(result: IndexResult) -> str:
    if result.added is None:
        return "built"
    return f"added {result.added:,}" if result.added else "current"
