"""`moon pairs`: the behaviour log -> MOON's post-training pairs and the image-search evaluation set.

1. Interactions: the click, cart and purchase rows of `events`, streamed in batches (the
   impressions only feed per-item exposure counts); one interaction per (session, item),
   carrying its strongest action. Every interaction gets a split by event day: the last
   `test_days` are test, the `valid_days` before them valid, the rest train. They are
   kept on disk in time order in a work folder and every later step streams them, so
   memory does not grow with the log (`log.py`, `spill.py`).
2. Stage 1 (`pairs_stage1`): MOON's nine query->item tasks from clicks, carts and
   purchases. A text query gives four tasks, a user photo three, and two items a user
   interacted with in one session give the two item-as-query tasks (the earlier item is
   the query). Each task is sampled without replacement to its share of `pairs.mix`; the
   scale is the largest the log supports, so the scarcest task (relative to its share)
   sets it. The train split of a labelled query set the user brought in
   (`moon ingest-queries`) adds its pairs on top, weighted `pairs.labelled_weight`
   (`labelled.py`).
3. Stage 2 (`pairs_stage2`): purchases only, item view richer-text+image, then in order
   (each switchable): similarity dedup (per item and query modality keep the query the
   embedder finds *least* similar: the hard, long-tail one), SPU merge (one pair per
   query and SPU; `pos_spu_id` makes sibling SKUs positives), category alignment
   (leaves over-represented against their impression share are down-sampled to it), the
   NER filter (query text and item title need `min_entities` entities), and hard
   negatives (same leaf, other SPU; plus embedder-mined top-k neighbours that are not the
   positive's SPU or near-duplicate group and not anything the session interacted with).
   A labelled set's train pairs join stage 2 as well.
4. `eval_image_search`: every user photo searched on the valid and test days, with the item
   photographed (or the session's strongest engagement) and its split; `eval_set.py`.

Every step records what it kept and dropped, and why, in `pairs_stats.json`. The tables'
digest covers the config and the labelled set, so they are made again when either changes.
"""


from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from moon import ui
from moon.config import MoonConfig
from moon.io import schema
from moon.io.tables import TableWriter, made_with
from moon.pairs.accounting import Accounting, Step
from moon.pairs.duplicates import near_duplicate_groups
from moon.pairs.eval_set import image_search_eval_set
from moon.pairs.labelled import labelled_digest, labelled_pairs
from moon.pairs.log import Catalogue, blocks, log_digest, read_interactions
from moon.pairs.spill import work_folder
from moon.pairs.stage1 import stage1_pairs
from moon.pairs.stage2 import similarity_embedder, stage2_pairs
from moon.run import RunDir

SECTIONS = ("world", "behaviour", "ingest", "pairs")  # the pairs, and what made the log they read
OUTPUTS = ("pairs_stage1", "pairs_stage2", "eval_image_search", "near_duplicates")
SHARD_ROWS = 65_536
SHARD_BYTES = 32 << 20


def build_pairs(config: MoonConfig, run_dir: Path) -> Accounting:
    """Reads `items` and `events` from run_dir and writes the pair tables and their accounting."""
    settings = config.pairs
    accounting = Accounting()
    clock = Clock()
    catalogue = Catalogue.read(run_dir)
    rng = np.random.default_rng([config.seed, 11])
    common = {"stage": "pairs", "config_digest": pairs_digest(config, run_dir), "seed": config.seed,
              "labelled_queries": labelled_digest(run_dir)}  # the labelled set's content digest, if any
    with _returning_memory_pool(), work_folder(run_dir) as work:
        log = read_interactions(run_dir, settings, catalogue, accounting, work)
        clock.lap("read log")
        stage1 = itertools.chain(stage1_pairs(log, settings, rng, accounting),
                                 labelled_pairs(run_dir, catalogue, settings, accounting))
        _write_pairs(run_dir, "pairs_stage1", stage1, common, accounting)
        clock.lap("stage 1")

        duplicates = near_duplicate_groups(catalogue.source, settings.phash_distance, settings.title_similarity, config.seed)
        groups = {"items": duplicates.num_rows, "groups": pc.count_distinct(duplicates["group_id"]).as_py()}
        accounting.totals["near duplicates"] = groups
        _write(run_dir, "near_duplicates", [duplicates], common, rows_as="items", groups=groups["groups"])
        clock.lap("near duplicates")
        embedder = similarity_embedder(settings, catalogue.items, log.query_texts())
        stage2 = itertools.chain(stage2_pairs(log, catalogue, duplicates, embedder, settings, rng, accounting, run_dir),
                                 labelled_pairs(run_dir, catalogue, settings, accounting, "stage 2"))
        _write_pairs(run_dir, "pairs_stage2", stage2, common, accounting)
        clock.lap("stage 2")

        evaluation = image_search_eval_set(log, catalogue, settings, run_dir, accounting)
        _write(run_dir, "eval_image_search", evaluation, common, rows_as="queries")
        clock.lap("evaluation set")
    accounting.totals["seconds"] = clock.laps
    accounting.write(RunDir(run_dir).pairs_stats)
    return accounting


def pairs_digest(config: MoonConfig, run_dir: Path) -> str:
    """The digest the pair tables carry: the log's (`log_digest`: config sections, and an ingested log
    itself) and the labelled set's when the run has one."""
    digest = log_digest(config, run_dir, *SECTIONS)
    labelled = labelled_digest(run_dir)
    return digest if labelled is None else hashlib.sha256(f"{digest}:{labelled}".encode()).hexdigest()[:16]


def is_current(config: MoonConfig, run_dir: Path) -> bool:
    """Whether every pair table was made from this config and this labelled set (the pipeline's test)."""
    return made_with(run_dir, OUTPUTS, pairs_digest(config, run_dir))


@contextmanager
def _returning_memory_pool() -> Iterator[None]:
    """Arrow allocates from jemalloc during the build, where pyarrow has it.

    Batches of photos pass through by the thousand; mimalloc (pyarrow's default) keeps
    freed pages of them per thread, so resident memory crept up with the log (peak 600 MB
    at 10M events, 725 MB at 30M), while jemalloc hands them back (500 and 530 MB).
    """
    try:
        pool = pa.jemalloc_memory_pool()
    except NotImplementedError:  # a pyarrow built without jemalloc
        yield
        return
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    try:
        yield
    finally:
        pa.set_memory_pool(previous)


class Clock:
    """Seconds spent in each phase, for the stats file and the benchmark."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self.last, 3)
        self.last = now


def _write(run_dir: Path, name: str, parts: Iterable[pa.Table], common: dict, *, rows_as: str, **manifest) -> None:
    """Writes a table from its parts; the manifest counts its rows under `rows_as`."""
    with TableWriter(run_dir, name, schema.TABLES[name]) as writer:
        _write_shards(writer, parts)
        writer.commit(**common, **{rows_as: writer.rows}, **manifest)


def _write_pairs(run_dir: Path, name: str, parts: Iterable[pa.Table], common: dict, accounting: Accounting) -> None:
    """Writes pair tables as they come, counting rows per split and task."""
    splits: Counter = Counter()
    tasks: Counter = Counter()

    def counted(parts: Iterable[pa.Table]) -> Iterator[pa.Table]:
        for part in parts:
            splits.update(_value_counts(part["split"]))
            tasks.update(_value_counts(part["task"]))
            yield part

    with TableWriter(run_dir, name, schema.PAIRS) as writer:
        _write_shards(writer, counted(parts))
        counts = {"splits": {split: splits[split] for split in schema.SPLITS}, "tasks": dict(tasks)}
        writer.commit(**common, **counts)
    accounting.totals[name] = {**counts["splits"], **{f"task {t}": n for t, n in tasks.items()}}


def _write_shards(writer: TableWriter, parts: Iterable[pa.Table]) -> None:
    """Gathers the parts (streamed batches give small ones) into shards of at most SHARD_ROWS rows
    and, unless one part is larger, SHARD_BYTES (rows with photos are large)."""
    pending: list[pa.Table] = []
    rows = size = 0
    for part in parts:
        if pending and (rows + part.num_rows > SHARD_ROWS or size + part.nbytes > SHARD_BYTES):
            for shard in blocks(pending, SHARD_ROWS):
                writer.write(shard)
            pending, rows, size = [], 0, 0
        pending.append(part)
        rows, size = rows + part.num_rows, size + part.nbytes
    for shard in blocks(pending, SHARD_ROWS):
        writer.write(shard)


def _value_counts(column: pa.ChunkedArray) -> dict[str, int]:
    return {entry["values"]: entry["counts"] for entry in pc.value_counts(column).to_pylist()}


def print_report(run_dir: Path) -> None:
    """The accounting table of the last `moon pairs` in run_dir."""
    stats = json.loads(RunDir(run_dir).pairs_stats.read_text())
    rows = [Accounting.row(Step(**step)) for step in stats["steps"]]
    ui.print_table(f"post-training pairs in {run_dir}", rows, ("stage", "step", "in", "kept", "dropped: reason"))
    duplicates = stats["totals"].get("near duplicates", {})
    ui.out.print(f"near-duplicate groups in the catalogue: {duplicates.get('groups', 0):,} ({duplicates.get('items', 0):,} items)")
