"""Writing files and folders so that a reader never sees them half written.

Everything a stage makes is first written under a hidden temporary name beside its final
place and renamed into place when complete. A killed writer leaves only a temporary name,
which the next writer of the same path removes.

    with atomic_dir(run / "models" / "stage1") as tmp:   # a folder: written whole, then swapped in
        model.save_pretrained(tmp)
    atomic_file(run / "report" / "metrics.json", text)   # one file
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yields an empty hidden folder beside `final`; when the block ends without an error, it
    replaces `final`. On an error, `final` is left as it was and the temporary folder is removed."""
    tmp = temporary_dir(final)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_into_place(tmp, final)


def temporary_dir(final: str | Path) -> Path:
    """A new empty hidden folder beside `final` to fill, after removing what killed writers left."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    return tmp


def swap_into_place(tmp: Path, final: str | Path) -> Path:
    """Renames the finished folder `tmp` to `final`; a previous folder there is removed only once
    the new one is in place, and stays where it was if the swap fails."""
    final = Path(final)
    old = tmp.with_name(f"{tmp.name}.old")
    try:
        if final.exists():
            final.rename(old)
        tmp.rename(final)
    except BaseException:
        if old.exists() and not final.exists():
            old.rename(final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale(final: str | Path) -> None:
    """Removes the temporary folders and files that killed writers of `final` left behind."""
    final = Path(final)
    if not final.parent.is_dir():
        return
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextmanager
def _replacing(path: str | Path) -> Iterator[Path]:
    """Yields a hidden temporary file name beside `path`, renamed to `path` once written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def atomic_file(path: str | Path, data: str | bytes) -> Path:
    """Writes one file (text as UTF-8) under a temporary name, then renames it to `path`; its
    folder is made if missing (a run's first study result, say)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with _replacing(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def atomic_json(path: str | Path, data: dict) -> Path:
    """A JSON document (a manifest, a plan, results), indented, written atomically."""
    return atomic_file(path, json.dumps(data, indent=2, default=str) + "\n")


def atomic_parquet(table: pa.Table, path: str | Path) -> Path:
    """A single-file table (rejects.parquet, a store shard) written atomically."""
    with _replacing(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return Path(path)
