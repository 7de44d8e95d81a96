"""Reading and writing the run directory's tables.

A table is a folder `<run_dir>/<name>/` of Parquet shards `part-NNNNN.parquet` plus a
`manifest.json` saying what made it. Writers fill a hidden temporary folder and rename
it into place on `commit()` (`moon.io.atomic`), so a reader never sees half a table, and a
killed writer leaves only a temporary folder that the next run removes.

A table that a user brought in (an ingested catalogue or log; its manifest says
`simulated: false`) is never replaced by a stage that makes the table some other way:
`refuse_to_replace` stops such a stage before it writes anything.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from moon.errors import UserError
from moon.io.atomic import atomic_json, swap_into_place, temporary_dir
from moon.run import MANIFEST, RunDir


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class TableWriter:
    """Streams record batches into shards of a new table version; nothing is visible until commit()."""

    def __init__(self, run_dir: Path, name: str, schema: pa.Schema, compression: str = "zstd"):
        self.final = RunDir(run_dir).table(name)
        self.tmp = temporary_dir(self.final)
        self.schema = schema
        self.compression = compression
        self.rows = 0
        self.shards = 0

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

    def carry(self, run_dir: Path, name: str) -> None:
        """Starts the new version with every shard of the current one (an append): shards are never
        changed once written, so they are linked, not copied, where the file system allows."""
        if not has_table(run_dir, name):
            return
        for shard in sorted(RunDir(run_dir).table(name).glob("part-*.parquet")):
            target = self.tmp / f"part-{self.shards:05d}.parquet"
            try:
                os.link(shard, target)
            except OSError:
                shutil.copyfile(shard, target)
            self.rows += pq.read_metadata(target).num_rows
            self.shards += 1

    def commit(self, **manifest) -> Path:
        """Writes the manifest and swaps the finished table into place."""
        if self.shards == 0:  # an empty table still carries its schema
            pq.write_table(self.schema.empty_table(), self.tmp / "part-00000.parquet", compression=self.compression)
            self.shards = 1
        info = {"table": self.final.name, "rows": self.rows, "shards": self.shards, "created_at": utc_now()}
        info.update(manifest)
        atomic_json(self.tmp / MANIFEST, info)
        return swap_into_place(self.tmp, self.final)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.tmp.exists():
            self.abort()  # an exception, or the caller never committed


def table_path(run_dir: Path, name: str) -> Path:
    path = RunDir(run_dir).table(name)
    if not (path / MANIFEST).exists():
        raise UserError(f"no '{name}' table in {run_dir}: run the stage that makes it first (see `moon --help`)")
    return path


def dataset(run_dir: Path, name: str) -> ds.Dataset:
    path = table_path(run_dir, name)
    return ds.dataset(sorted(path.glob("part-*.parquet")), format="parquet")


def read_batches(source: ds.FileSystemDataset | pa.Table, columns: list[str] | None, rows: int) -> Iterator[pa.Table]:
    """A table's rows in order, up to `rows` at a time, each read when the caller asks for it.

    A dataset scanner decodes ahead of a slow consumer (hundreds of megabytes when the rows
    hold photos); this reads the files in turn with a pull reader, so memory holds about one batch.
    """
    if isinstance(source, pa.Table):
        batches = source.select(columns or source.column_names).to_batches(max_chunksize=rows)
        yield from (pa.Table.from_batches([batch]) for batch in batches if batch.num_rows)
        return
    for path in source.files:
        with pq.ParquetFile(path) as file:
            for batch in file.iter_batches(batch_size=rows, columns=columns):
                if batch.num_rows:
                    yield pa.Table.from_batches([batch])


def read_table(run_dir: Path, name: str, columns: list[str] | None = None) -> pa.Table:
    return dataset(run_dir, name).to_table(columns=columns)


def read_manifest(run_dir: Path, name: str) -> dict:
    return json.loads((table_path(run_dir, name) / MANIFEST).read_text())


def has_table(run_dir: Path, name: str) -> bool:
    return RunDir(run_dir).has_table(name)


def made_with(run_dir: Path, names: tuple[str, ...], digest: str) -> bool:
    """Whether every table in `names` exists and its manifest carries `digest`: a stage's outputs are current."""
    return bool(names) and all(has_table(run_dir, name) and read_manifest(run_dir, name).get("config_digest") == digest
                               for name in names)


def refuse_to_replace(run_dir: Path, name: str, stage: str, instead: str) -> None:
    """Stops `stage` before it replaces a table a user brought in (an ingested catalogue or log: its
    manifest says `simulated: false`), saying what is there, who made it and what to do instead."""
    manifest = read_manifest(run_dir, name) if has_table(run_dir, name) else {}
    if manifest.get("simulated") is not False:
        return
    made = manifest.get("ingest") or manifest  # behaviour simulated over a catalogue keeps its ingest manifest
    origin = f" from {made['source']}" if made.get("source") else ""
    raise UserError(f"{RunDir(run_dir).table(name)} holds {manifest.get('rows', 0):,} rows a user brought in "
                    f"(made by `moon {made.get('stage', 'ingest')}`{origin}) and `moon {stage}` would replace "
                    f"them: {instead}")
