"""`moon embed`: the catalogue and the behaviour log's distinct queries embedded into a
representation store version, by a trained model or by a model made without training.

Batch mode makes (or continues) a version partition by partition. The catalogue's rows are
split into `store.partitions` contiguous ranges, and so are the log's distinct queries (in
order of first appearance, `moon.queries.distinct_queries`; their count is fixed in the plan
when the version is made); each partition of either kind becomes one shard, written whole
and renamed into place. Under `torchrun` the missing partitions of both kinds are dealt
round-robin to the ranks, and rank 0 writes the manifest once every shard exists. A killed
run therefore loses at most the partitions it was writing: run it again and it computes only
the partitions without a shard, into the same version (the one made from the same model,
catalogue and log: the plan records the items' and the events' table digests). A run
without an `events` table, or with a model that describes items only (the oracle), embeds
items only and says so.

Incremental mode embeds only the catalogue items and the log's queries the latest version
does not hold yet (items launched and queries searched since it was made) with the model
that made it, and adds them to it as new shards. Items dropped from the catalogue stay in
the version.

`--model` names a trained stage or model directory (`moon.represent.encoders.TrainedEncoder`;
items in the view the model serves, `model.served_view` in its own settings, richer text +
image by default) or a model made without training (`moon.represent.controls`: baseline,
random, truth). Queries are embedded the way `moon eval retrieval` embeds them: texts through
the model's text path, photos through its image path. Vectors are embedded at the full
dimension and L2-normalised; the store keeps them as float16 (see `moon.store.versions`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import torch

from moon import ui
from moon.config import MoonConfig
from moon.errors import UserError
from moon.io.tables import dataset, has_table, read_table
from moon.model.embedder import SETTINGS_FILE
from moon.queries import DISTINCT_QUERIES, distinct_queries
from moon.represent.controls import CONTROLS, open_control, reopen_control
from moon.represent.encoders import ITEM_COLUMNS, TrainedEncoder, VersionEncoder
from moon.run import MODEL_STAGES, RunDir
from moon.store.versions import (
    DTYPE,
    ITEMS,
    QUERIES,
    Store,
    StoreVersion,
    VersionBuilder,
    checkpoint_digest,
    row_kind,
    table_digest,
)
from moon.train.loop import Processes

# What a log line calls all the rows of one kind, and one of them.
HELD = {ITEMS: "catalogue items", QUERIES: "distinct queries of the log"}
ONE = {ITEMS: "item", QUERIES: "query"}


def embed_catalogue(config: MoonConfig, run_dir: Path, model: str | None = None, version: str | None = None,
                    incremental: bool = False) -> StoreVersion:
    """Embeds the run's items table and its log's distinct queries into a store version and returns
    it (on every rank).

    `model` is a stage name, a model directory or a control (baseline, random, truth; default:
    stage2, else stage1, else pretrain; incremental: the model that made the version).
    `version` names the version to make or continue (incremental: to add to; default: the latest).
    """
    processes = Processes.start()
    run = add_new_rows if incremental else embed_all
    stored = run(config, Path(run_dir), processes, model, version)
    processes.stop()
    return stored


def embed_all(config: MoonConfig, run_dir: Path, processes: Processes, model: str | None,
              version: str | None) -> StoreVersion:
    """Batch mode: fills the missing partitions of the version for this model, catalogue and log."""
    store = Store(run_dir)
    encoder = open_encoder(config, run_dir, model, processes.device)
    decision = None
    if processes.is_main:  # one process decides the version and what is left to do
        plan = make_plan(config, run_dir, encoder)
        builder = store.begin(plan, version, new_plan=lambda: planned_queries(run_dir, plan))
        decision = (builder.name, {of: builder.missing(of) for of in builder.kinds()}, builder.finished)
        if not builder.finished:
            if reason := items_only(run_dir, encoder):
                ui.log(f"embedding items only: {reason}")
            encoder.attach(builder.path)  # before the other ranks: a state it makes is there for them
    name, missing, finished = processes.from_rank_zero(decision)
    builder = store.builder(name)
    if finished:
        processes.say(f"store version {name} is current: made by the same model from the same catalogue and log")
        return store.open(name)
    if not processes.is_main:
        encoder.attach(builder.path)
    partitions = builder.plan["partitions"]
    processes.say(f"{name}: " + ", ".join(f"{len(missing[of])} of {partitions} {ONE[of]} partitions to embed"
                                          for of in missing) + _resuming(missing, partitions))

    work = [(of, p) for of in missing for p in missing[of]]
    mine = work[processes.rank :: processes.world_size]
    started = time.perf_counter()
    for of in missing:
        parts = [p for kind, p in mine if kind == of]
        total = sum(_size(builder.bounds(p, of)) for p in parts)
        with processes.progress(f"embed {name} {of}", total, unit=of) as advance:
            for p, rows in read_partitions(run_dir, builder, of, parts, encoder.item_columns):
                builder.write(p, ids_of(rows, of), encoder.encode(rows, of, advance), of)
    processes.barrier()
    if processes.is_main:
        counts = {of: sum(_size(builder.bounds(p, of)) for p in missing[of]) for of in missing}
        processes.say(rate(counts, time.perf_counter() - started))
        builder.finish(processes=processes.world_size)
    processes.barrier()
    return store.open(name)


def make_plan(config: MoonConfig, run_dir: Path, encoder: VersionEncoder) -> dict:
    """What a version is made from: the model, the catalogue, the log and the partitioning."""
    queries = items_only(run_dir, encoder) is None
    plan = {
        **encoder.plan(),
        "dtype": DTYPE,
        "partitions": config.store.partitions,
        "items": dataset(run_dir, "items").count_rows(),
        "items_digest": table_digest(run_dir, "items"),
        "events_digest": table_digest(run_dir, "events") if queries else None,
    }
    if encoder.queries_absent:
        plan["queries_absent"] = encoder.queries_absent
    return plan


def planned_queries(run_dir: Path, plan: dict) -> dict:
    """What a new version's plan adds: the number of the log's distinct queries it will hold
    (a pass over the log, made once per version)."""
    if plan["events_digest"] is None:
        return {}
    count = 0
    with ui.progress("count the log's distinct queries", None, unit="queries") as advance:
        for batch in distinct_queries(run_dir):
            count += batch.num_rows
            advance(batch.num_rows)
    return {QUERIES: {"count": count}}


def items_only(run_dir: Path, encoder: VersionEncoder) -> str | None:
    """Why the version gets no query vectors (the model describes none, or the run has no log);
    None: it gets the log's distinct queries."""
    if encoder.queries_absent:
        return encoder.queries_absent
    if not has_table(run_dir, "events"):
        return f"{run_dir} has no events table, so there are no queries to embed"
    return None


def read_partitions(run_dir: Path, builder: VersionBuilder, of: str, parts: Sequence[int],
                    columns: Sequence[str]) -> Iterator[tuple[int, pa.Table]]:
    """(partition, rows) of one kind for each of `parts`: catalogue rows read for that range only
    (images are the bulk); queries cut from one pass over the log."""
    if of == ITEMS:
        items = dataset(run_dir, "items")
        for p in parts:
            yield p, read_rows(items, np.arange(*builder.bounds(p, of)), columns)
        return
    yield from cut(distinct_queries(run_dir), {p: builder.bounds(p, of) for p in parts}, DISTINCT_QUERIES)


def cut(batches: Iterable[pa.Table], bounds: dict[int, tuple[int, int]],
        schema: pa.Schema) -> Iterator[tuple[int, pa.Table]]:
    """Partitions (rows [start, stop) of a stream of tables), each yielded as soon as the stream
    has passed its end; rows of other partitions are skipped, and the stream is left as soon
    as the last partition is complete. Memory holds one partition."""
    order = sorted(bounds.items(), key=lambda item: item[1])
    if not order:
        return
    pieces: list[pa.Table] = []
    offset, next_part = 0, 0
    for batch in batches:
        end = offset + batch.num_rows
        while next_part < len(order):
            p, (start, stop) = order[next_part]
            if min(stop, end) > max(start, offset):
                pieces.append(batch.slice(max(start, offset) - offset, min(stop, end) - max(start, offset)))
            if stop > end:
                break
            yield p, pa.concat_tables(pieces) if pieces else schema.empty_table()
            pieces, next_part = [], next_part + 1
        offset = end
        if next_part == len(order):
            return
    for p, (_, stop) in order[next_part:]:
        if stop > offset:
            raise UserError(f"the log holds {offset:,} distinct queries but the version was planned for at least "
                            f"{stop:,}: the events table changed while the version was made; run `moon embed` again")
        yield p, pa.concat_tables(pieces) if pieces else schema.empty_table()
        pieces = []


def add_new_rows(config: MoonConfig, run_dir: Path, processes: Processes, model: str | None,
                 version: str | None) -> StoreVersion:
    """Incremental mode: rank 0 adds the items and queries the version lacks; other ranks wait."""
    store = Store(run_dir)
    name = None
    if processes.is_main:
        name = _add_new_rows(config, run_dir, store, model, version, processes.device).name
    name = processes.from_rank_zero(name)
    return store.open(name)


def _add_new_rows(config: MoonConfig, run_dir: Path, store: Store, model: str | None, version: str | None,
                  device: torch.device) -> StoreVersion:
    target = store.open(version) if version else store.latest()
    encoder = reopen_encoder(config, run_dir, target, model, device)
    encoder.attach(target.path)
    kinds = [ITEMS, QUERIES]
    if reason := items_only(run_dir, encoder):
        ui.log(f"adding items only: {reason}")
        kinds = [ITEMS]
    for of in kinds:
        rows, total = new_rows(run_dir, target, of, encoder.item_columns)
        if rows.num_rows == 0:
            ui.log(f"store version {target.name} already holds all {total:,} {HELD[of]}")
            continue
        started = time.perf_counter()
        with ui.progress(f"embed new {of} into {target.name}", rows.num_rows, unit=of) as advance:
            vectors = encoder.encode(rows, of, advance)
        ui.log(rate({of: rows.num_rows}, time.perf_counter() - started))
        added = target.add(ids_of(rows, of), vectors, of)
        ui.log(f"added {added:,} new {of} to {target.name} ({target.count(of):,} {of})")
    return target


def new_rows(run_dir: Path, target: StoreVersion, of: str, columns: Sequence[str]) -> tuple[pa.Table, int]:
    """The rows of one kind the version lacks, and how many the run has in all."""
    if of == ITEMS:
        ids = read_table(run_dir, "items", columns=["item_id"])["item_id"].to_pylist()
        return read_rows(dataset(run_dir, "items"), np.flatnonzero(target.rows(ids) < 0), columns), len(ids)
    held = pa.array(target.ids(QUERIES), pa.string())
    found, total = [], 0
    for batch in distinct_queries(run_dir):
        total += batch.num_rows
        found.append(batch.filter(pc.invert(pc.is_in(batch["query_id"], value_set=held))))
    return pa.concat_tables(found) if found else DISTINCT_QUERIES.empty_table(), total


def open_encoder(config: MoonConfig, run_dir: Path, model: str | None, device: torch.device) -> VersionEncoder:
    """The encoder of a new version: a control by name, else a trained model (`resolve_model`)."""
    if model in CONTROLS:
        return open_control(model, config, run_dir)
    label, path = resolve_model(run_dir, model)
    return TrainedEncoder(path, label, device, config.store.batch_size)


def reopen_encoder(config: MoonConfig, run_dir: Path, target: StoreVersion, model: str | None,
                   device: torch.device) -> VersionEncoder:
    """The encoder that made `target`, to add to it; `model`, if given, must be that one."""
    made_by = target.manifest
    control = made_by.get("control")
    if control or model in CONTROLS:
        if model not in (None, control):
            raise UserError(f"--model {model} is not the model that made store version {target.name} (made by "
                            f"{made_by['model']}): pass --model {made_by['model']}, or run "
                            f"`moon embed --model {model}` without --incremental for a new version")
        return reopen_control(made_by, run_dir)
    path = resolve_model(run_dir, model)[1] if model else Path(made_by["model_dir"])
    if not (path / SETTINGS_FILE).is_file() or checkpoint_digest(path) != made_by["checkpoint_digest"]:
        raise UserError(f"{path} is not the model that made store version {target.name} (checkpoint "
                        f"{made_by['checkpoint_digest']}): pass --model with that model's directory, or run "
                        "`moon embed` without --incremental for a new version")
    return TrainedEncoder(path, made_by["model"], device, config.store.batch_size, item_view=made_by["item_view"])


def resolve_model(run_dir: Path, model: str | None) -> tuple[str, Path]:
    """(label, directory) of the trained model to embed with: a stage of the run (default: the
    latest trained one) or a model directory."""
    run = RunDir(run_dir)
    if model is None:
        if (latest := run.latest_model()) is not None:
            return latest, run.model(latest)
        raise UserError(f"no trained model in {run.root / 'models'}: run `moon posttrain --stage 1` "
                        "(or `moon pretrain`) first, pass --model DIR, or one made without training "
                        f"({', '.join(CONTROLS)})")
    if model in MODEL_STAGES:
        if not run.has_model(model):
            raise UserError(f"no {model} model in {run.model(model)}: train it first or pick another --model")
        return model, run.model(model)
    path = Path(model)
    if not (path / SETTINGS_FILE).is_file():
        raise UserError(f"--model {model} is neither a stage ({', '.join(MODEL_STAGES)}), a model made without "
                        f"training ({', '.join(CONTROLS)}), nor a model directory (one with {SETTINGS_FILE})")
    return path.resolve().name, path


def read_rows(items: ds.Dataset, rows: np.ndarray, columns: Sequence[str] = ITEM_COLUMNS) -> pa.Table:
    """The catalogue rows an encoder needs, read for these rows only (images are the bulk)."""
    return items.take(rows, columns=list(columns))


def ids_of(rows: pa.Table, of: str) -> list[str]:
    return rows[row_kind(of).key].to_pylist()


def rate(counts: dict[str, int], seconds: float) -> str:
    """E.g. 'embedded 200 items and 357 queries in 3.1s (180 items and queries/s)'."""
    seconds = max(seconds, 1e-9)
    what = " and ".join(of for of in counts)
    done = " and ".join(f"{n:,} {of}" for of, n in counts.items())
    return f"embedded {done} in {seconds:.1f}s ({sum(counts.values()) / seconds:,.0f} {what}/s)"


def _resuming(missing: dict[str, list[int]], partitions: int) -> str:
    done = sum(partitions - len(parts) for parts in missing.values())
    return f" ({done} already done, resuming)" if done else ""


def _size(bounds: tuple[int, int]) -> int:
    return bounds[1] - bounds[0]
