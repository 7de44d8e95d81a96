"""`moon pairs`: the behaviour log -> MOON's post-training pairs and the image-search evaluation set.

1. Interactions: the click, cart and purchase rows of `events`, streamed in batches (the
   impressions only feed per-item exposure counts); one interaction per (session, item),
   carrying its strongest action. Every interaction gets a split by event day: the last
   `test_days` are test, the `valid_days` before them valid, the rest train.
2. Stage 1 (`pairs_stage1`): MOON's nine query->item tasks from clicks, carts and
   purchases. A text query gives four tasks, a user photo three, and two items a user
   interacted with in one session give the two item-as-query tasks (the earlier item is
   the query). Each task is sampled without replacement to its share of `pairs.mix`; the
   scale is the largest the log supports, so the scarcest task (relative to its share)
   sets it.
3. Stage 2 (`pairs_stage2`): purchases only, item view richer-text+image, then in order
   (each switchable): similarity dedup (per item and query modality keep the query the
   embedder finds *least* similar: the hard, long-tail one), SPU merge (one pair per
   query and SPU; `pos_spu_id` makes sibling SKUs positives), category alignment
   (leaves over-represented against their impression share are down-sampled to it), the
   NER filter (query text and item title need `min_entities` entities), and hard
   negatives (same leaf, other SPU; plus embedder-mined top-k neighbours that are not the
   positive's SPU or near-duplicate group and not anything the session interacted with).
4. `eval_image_search`: every (user photo, purchased item) of the test days.

Every step records what it kept and dropped, and why, in `pairs_stats.json`.
"""


from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from moon import ui
from moon.config import MoonConfig
from moon.io import schema
from moon.io.tables import TableWriter, read_table
from moon.pairs.accounting import Accounting, Step
from moon.pairs.duplicates import near_duplicate_groups
from moon.pairs.eval_set import image_search_eval_set
from moon.pairs.log import Catalogue, read_interactions
from moon.pairs.stage1 import stage1_pairs
from moon.pairs.stage2 import similarity_embedder, stage2_pairs
from moon.run import RunDir

SECTIONS = ("world", "behaviour", "ingest", "pairs")  # the pairs, and what made the log they read
OUTPUTS = ("pairs_stage1", "pairs_stage2", "eval_image_search", "near_duplicates")


def build_pairs(config: MoonConfig, run_dir: Path) -> Accounting:
    """Reads `items` and `events` from run_dir and writes the pair tables and their accounting."""
    settings = config.pairs
    accounting = Accounting()
    clock = Clock()
    items = read_table(run_dir, "items")
    catalogue = Catalogue.of(items)
    log = read_interactions(run_dir, settings, catalogue, accounting)
    clock.lap("read log")
    rng = np.random.default_rng([config.seed, 11])
    common = {"stage": "pairs", "config_digest": config.digest(*SECTIONS), "seed": config.seed}

    _write_pairs(run_dir, "pairs_stage1", stage1_pairs(log, settings, rng, accounting, run_dir), common, accounting)
    clock.lap("stage 1")

    duplicates = near_duplicate_groups(items, settings.phash_distance, settings.title_similarity, config.seed)
    groups = {"items": duplicates.num_rows, "groups": pc.count_distinct(duplicates["group_id"]).as_py()}
    accounting.totals["near duplicates"] = groups
    _write(run_dir, "near_duplicates", duplicates, common, **groups)
    clock.lap("near duplicates")
    embedder = similarity_embedder(settings, items, log.interactions)
    stage2 = stage2_pairs(log, catalogue, duplicates, embedder, settings, rng, accounting, run_dir, items)
    _write_pairs(run_dir, "pairs_stage2", [stage2], common, accounting)
    clock.lap("stage 2")

    evaluation = image_search_eval_set(log, catalogue, run_dir, settings, accounting)
    _write(run_dir, "eval_image_search", evaluation, common, queries=evaluation.num_rows)
    clock.lap("evaluation set")
    accounting.totals["seconds"] = clock.laps
    accounting.write(RunDir(run_dir).pairs_stats)
    return accounting


class Clock:
    """Seconds spent in each phase, for the stats file and the benchmark."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self.last, 3)
        self.last = now


def _write(run_dir: Path, name: str, table: pa.Table, common: dict, **manifest) -> None:
    with TableWriter(run_dir, name, schema.TABLES[name]) as writer:
        for start in range(0, table.num_rows, 65_536):
            writer.write(table.slice(start, 65_536))
        writer.commit(**common, **manifest)


def _write_pairs(run_dir: Path, name: str, parts: Iterable[pa.Table], common: dict, accounting: Accounting) -> None:
    """Writes pair tables as they come (one task at a time for stage 1), counting rows per split and task."""
    splits: Counter = Counter()
    tasks: Counter = Counter()
    with TableWriter(run_dir, name, schema.PAIRS) as writer:
        for part in parts:
            splits.update(part["split"].to_pylist())
            tasks.update(part["task"].to_pylist())
            for start in range(0, part.num_rows, 65_536):
                writer.write(part.slice(start, 65_536))
        counts = {"splits": {split: splits[split] for split in schema.SPLITS}, "tasks": dict(tasks)}
        writer.commit(**common, **counts)
    accounting.totals[name] = {**counts["splits"], **{f"task {t}": n for t, n in tasks.items()}}


def print_report(run_dir: Path) -> None:
    """The accounting table of the last `moon pairs` in run_dir."""
    stats = json.loads(RunDir(run_dir).pairs_stats.read_text())
    rows = [Accounting.row(Step(**step)) for step in stats["steps"]]
    ui.print_table(f"post-training pairs in {run_dir}", rows, ("stage", "step", "in", "kept", "dropped: reason"))
    duplicates = stats["totals"].get("near duplicates", {})
    ui.out.print(f"near-duplicate groups in the catalogue: {duplicates.get('groups', 0):,} ({duplicates.get('items', 0):,} items)")
