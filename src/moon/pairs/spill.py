"""Tables larger than memory, spilled to Parquet files in a work folder and read back one part at a time.

`moon pairs` works in memory that does not grow with the behaviour log, so the work that
needs the whole log at once (one interaction per session and item, the item pairs of a
session, time order) is split into parts on disk:

- by session (`session_parts`): a hash of the session id picks the part, so all rows of a
  session land in one part and per-session work needs one part in memory at a time;
- by time (`TimeBuckets`): disjoint ranges of `ts`, sized from a histogram of the rows, so
  that sorting each part and reading the parts in turn gives the whole table in time order.

The work folder is hidden beside the run's tables and removed when the build ends.
"""

from __future__ import annotations

import shutil
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from moon.io.atomic import temporary_dir

# Two spills are written at once, each with a file open per part: at most 2 x 256 files
# stays under the common limit of 1024 open files, whatever the sizing asks for.
MAX_PARTS = 256
SORTED_ROW_GROUP = 16_384  # rows per row group of a sorted part: readers hold one at a time
HISTOGRAM_BINS = 1 << 16


@contextmanager
def work_folder(run_dir: Path) -> Iterator[Path]:
    """A new hidden folder in run_dir for spill files, removed when the block ends, even on an error.
    Folders that killed builds left behind are removed first."""
    folder = temporary_dir(Path(run_dir) / "pairs-work")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def part_count(rows: int, rows_per_part: int) -> int:
    return int(min(MAX_PARTS, max(1, -(-rows // max(rows_per_part, 1)))))


class Spill:
    """A table of one schema in numbered part files; rows are appended to their part as they come.

    Parts are Arrow IPC streams: unlike Parquet files, an open stream keeps no metadata per
    write, so many parts written in many small pieces cost no memory. `sort_parts` turns
    them into Parquet files, which readers can read a few columns of.
    """

    def __init__(self, folder: Path, schema: pa.Schema, parts: int):
        self.folder = folder
        self.schema = schema
        self.parts = parts
        self._writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
        folder.mkdir(parents=True)

    def path(self, part: int) -> Path:
        return self.folder / f"part-{part:05d}.arrows"

    def write(self, table: pa.Table, part: np.ndarray) -> None:
        """Appends each row of `table` to the part named by `part` (one int per row), keeping row order."""
        order = np.argsort(part, kind="stable")
        table = table.select(self.schema.names).cast(self.schema).take(order)
        bounds = np.searchsorted(part[order], np.arange(self.parts + 1))
        for p in np.flatnonzero(np.diff(bounds)):
            if p not in self._writers:
                self._writers[p] = pa.ipc.new_stream(str(self.path(p)), self.schema)
            self._writers[p].write_table(table.slice(bounds[p], bounds[p + 1] - bounds[p]))

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()

    def read(self, part: int) -> pa.Table:
        """Every row of a part, in the order written, as one chunk (a part is written in many small
        pieces, and taking rows from a column of many chunks is slow)."""
        path = self.path(part)
        if not path.exists():
            return self.schema.empty_table()
        with pa.OSFile(str(path)) as file:
            return pa.ipc.open_stream(file).read_all().combine_chunks()

    def remove(self, part: int) -> None:
        self.path(part).unlink(missing_ok=True)

    def sort_parts(self, keys: list[str], advance=lambda n=1: None) -> ds.FileSystemDataset:
        """Sorts each part by `keys` (ascending) into a Parquet file; the parts in turn, as one dataset.

        Each part is written in row groups from its sort order, so only the part and one
        row group of its sorted copy are in memory at a time.
        """
        self.close()
        files = []
        for part in range(self.parts):
            table = self.read(part)
            if not table.num_rows:
                advance(1)
                continue
            order = pc.sort_indices(table.select(keys), [(key, "ascending") for key in keys])
            files.append(str(self.path(part).with_suffix(".parquet")))
            # Spill files are read a few times and then removed: not worth compressing.
            with pq.ParquetWriter(files[-1], self.schema, compression="none") as writer:
                for start in range(0, len(order), SORTED_ROW_GROUP):
                    writer.write_table(table.take(order[start:start + SORTED_ROW_GROUP]))
            del table
            self.remove(part)
            advance(1)
        return ds.dataset(files, schema=self.schema, format="parquet")


def session_parts(sessions: pa.Array | pa.ChunkedArray, parts: int) -> np.ndarray:
    """The part of each row's session: crc32 of its id, so the same session always gets the same part."""
    if isinstance(sessions, pa.ChunkedArray):
        sessions = sessions.combine_chunks()
    encoded = pc.dictionary_encode(sessions)
    hashes = np.array([zlib.crc32(s.encode()) for s in encoded.dictionary.to_pylist()], np.int64) % parts
    return hashes[encoded.indices.to_numpy(zero_copy_only=False)]


class TimeBuckets:
    """Disjoint, ordered ranges of time holding about the same number of rows each.

    Rows are first counted per bin of the log's period (`add`); `split` then cuts the bins
    into buckets of about `rows_per_bucket` rows. Times outside the period fall into the
    first or last bin. A bucket is never smaller than a bin, so a burst of rows inside one
    bin makes one large bucket.
    """

    def __init__(self, start_ms: int, end_ms: int):
        self.start_ms = start_ms
        self.span_ms = max(end_ms - start_ms, 1)
        self.counts = np.zeros(HISTOGRAM_BINS, np.int64)
        self.first_bins = np.zeros(1, np.int64)  # the first bin of each bucket

    def _bins(self, ts: pa.Array | pa.ChunkedArray) -> np.ndarray:
        offset = np.clip(ts.cast(pa.int64()).to_numpy() - self.start_ms, 0, self.span_ms - 1)
        return offset * HISTOGRAM_BINS // self.span_ms

    def add(self, ts: pa.Array | pa.ChunkedArray) -> None:
        self.counts += np.bincount(self._bins(ts), minlength=HISTOGRAM_BINS)

    @property
    def count(self) -> int:
        return len(self.first_bins)

    def split(self, rows_per_bucket: int) -> None:
        """Cuts the bins into buckets of about `rows_per_bucket` rows."""
        total = int(self.counts.sum())
        count = part_count(total, rows_per_bucket)
        before = np.cumsum(self.counts) - self.counts  # rows in the bins before each bin
        bucket = np.minimum(before * count // max(total, 1), count - 1)
        self.first_bins = np.searchsorted(bucket, np.arange(count))

    def of(self, ts: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """The bucket of each time."""
        return np.searchsorted(self.first_bins, self._bins(ts), side="right") - 1
