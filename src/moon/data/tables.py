"""Reading and writing the run directory's tables.

A table is a folder `<run_dir>/<name>/` of Parquet shards `part-NNNNN.parquet` plus a
`manifest.json` saying what made it. Writers fill a hidden temporary folder and rename
it into place on `commit()`, so a reader never sees half a table, and a killed writer
leaves only a temporary folder that the next run removes.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from moon.errors import UserError

MANIFEST = "manifest.json"


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class TableWriter:
    """Streams record batches into shards of a new table version; nothing is visible until commit()."""

    def __init__(self, run_dir: Path, name: str, schema: pa.Schema, compression: str = "zstd"):
        self.final = Path(run_dir) / name
        self.tmp = Path(run_dir) / f".{name}.tmp-{os.getpid()}"
        self.schema = schema
        self.compression = compression
        self.rows = 0
        self.shards = 0
        for stale in Path(run_dir).glob(f".{name}.tmp-*"):  # left by a killed writer
            shutil.rmtree(stale, ignore_errors=True)
        self.tmp.mkdir(parents=True)

    def write(self, data: pa.Table | pa.RecordBatch | dict) -> None:
        """Writes one shard. `data` is cast to the table's schema (a dict is columns by name)."""
        table = pa.table(data, schema=self.schema) if isinstance(data, dict) else data
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        table = table.select(self.schema.names).cast(self.schema)
        if table.num_rows == 0:
            return
        pq.write_table(table, self.tmp / f"part-{self.shards:05d}.parquet", compression=self.compression)
        self.rows += table.num_rows
        self.shards += 1

    def commit(self, **manifest) -> Path:
        """Writes the manifest and swaps the finished table into place."""
        if self.shards == 0:  # an empty table still carries its schema
            pq.write_table(self.schema.empty_table(), self.tmp / "part-00000.parquet", compression=self.compression)
            self.shards = 1
        info = {"table": self.final.name, "rows": self.rows, "shards": self.shards, "created_at": utc_now()}
        info.update(manifest)
        (self.tmp / MANIFEST).write_text(json.dumps(info, indent=2, default=str) + "\n")
        old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
        if self.final.exists():
            self.final.rename(old)
        self.tmp.rename(self.final)
        shutil.rmtree(old, ignore_errors=True)
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.tmp.exists():
            self.abort()  # an exception, or the caller never committed


def write_text_atomic(path: Path, text: str) -> Path:
    """Writes a single text file (a manifest, a report) under a temporary name, then renames it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def write_parquet_atomic(table: pa.Table, path: Path) -> Path:
    """Writes a single-file table (e.g. rejects.parquet) under a temporary name, then renames it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)
    return path


def table_path(run_dir: Path, name: str) -> Path:
    path = Path(run_dir) / name
    if not (path / MANIFEST).exists():
        raise UserError(f"no '{name}' table in {run_dir}: run the stage that makes it first (see `moon --help`)")
    return path


def dataset(run_dir: Path, name: str) -> ds.Dataset:
    path = table_path(run_dir, name)
    return ds.dataset(sorted(path.glob("part-*.parquet")), format="parquet")


def read_table(run_dir: Path, name: str, columns: list[str] | None = None) -> pa.Table:
    return dataset(run_dir, name).to_table(columns=columns)


def read_manifest(run_dir: Path, name: str) -> dict:
    return json.loads((table_path(run_dir, name) / MANIFEST).read_text())


def has_table(run_dir: Path, name: str) -> bool:
    return (Path(run_dir) / name / MANIFEST).exists()
