"""`moon embed`: the catalogue embedded by a trained model into a representation store version.

Batch mode makes (or continues) a version partition by partition. The catalogue's rows are
split into `store.partitions` contiguous ranges; each partition becomes one shard, written
whole and renamed into place. Under `torchrun` the missing partitions are dealt round-robin
to the ranks, and rank 0 writes the manifest once every shard exists. A killed run therefore
loses at most the partitions it was writing: run it again and it computes only the
partitions without a shard, into the same version (the one made from the same model weights
and catalogue).

Incremental mode embeds only the catalogue items the latest version does not hold yet
(items launched since it was made) with the model that made it, and adds them to it as one
new shard. Items dropped from the catalogue stay in the version.

Items are seen in the view the model serves (`model.served_view` in its own settings, richer
text + image by default), embedded at the full dimension and L2-normalised; the store keeps
them as float16 (see `moon.store.versions`).
"""

from __future__ import annotations

import hashlib
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import torch
import torch.distributed as dist

from moon import ui
from moon.config import MoonConfig
from moon.errors import UserError
from moon.io.tables import MANIFEST, dataset, read_table, table_path
from moon.model.embedder import SETTINGS_FILE, Embedder
from moon.model.views import ItemViews
from moon.run import MODEL_STAGES, RunDir
from moon.store.versions import DTYPE, Store, StoreVersion, checkpoint_digest, partition_bounds
from moon.train.loop import Processes

ITEM_COLUMNS = ["item_id", "title", "category", "attributes", "image"]


def embed_catalogue(config: MoonConfig, run_dir: Path, model: str | None = None, version: str | None = None,
                    incremental: bool = False) -> StoreVersion:
    """Embeds the run's items table into a store version and returns it (on every rank).

    `model` is a stage name or a model directory (default: stage2, else stage1, else pretrain;
    incremental: the model that made the version). `version` names the version to make or
    continue (incremental: to add to; default: the latest).
    """
    processes = Processes.start()
    run = add_new_items if incremental else embed_all
    stored = run(config, Path(run_dir), processes, model, version)
    processes.stop()
    return stored


def embed_all(config: MoonConfig, run_dir: Path, processes: Processes, model: str | None,
              version: str | None) -> StoreVersion:
    """Batch mode: fills the missing partitions of the version for this model and catalogue."""
    store = Store(run_dir)
    label, path = resolve_model(run_dir, model)
    embedder = Embedder.load(path, processes.device)
    decision = None
    if processes.is_main:  # one process decides the version and what is left to do
        builder = store.begin(make_plan(config, run_dir, label, path, embedder), version)
        decision = (builder.name, builder.missing(), builder.finished)
    name, missing, finished = from_rank_zero(processes, decision)
    builder = store.builder(name)
    if finished:
        say(processes, f"store version {name} is current: made by the same model from the same catalogue")
        return store.open(name)
    partitions, n = builder.plan["partitions"], builder.plan["items"]
    bounds = {p: partition_bounds(n, partitions, p) for p in missing}
    size = {p: stop - start for p, (start, stop) in bounds.items()}
    done = partitions - len(missing)
    say(processes, f"{name}: {len(missing)} of {partitions} partitions to embed"
        + (f" ({done} already done, resuming)" if done else ""))

    mine = missing[processes.rank :: processes.world_size]
    items = dataset(run_dir, "items")
    started = time.perf_counter()
    with progress(processes, f"embed {name}", int(sum(size[p] for p in mine))) as advance:
        for p in mine:
            rows = read_rows(items, np.arange(*bounds[p]))
            vectors = encode_items(embedder, ItemViews(rows), builder.plan["item_view"], config.store.batch_size, advance)
            builder.write(p, rows["item_id"].to_pylist(), vectors)
    processes.barrier()
    if processes.is_main:
        say(processes, rate(int(sum(size.values())), time.perf_counter() - started))
        builder.finish(processes=processes.world_size)
    processes.barrier()
    return store.open(name)


def add_new_items(config: MoonConfig, run_dir: Path, processes: Processes, model: str | None,
                  version: str | None) -> StoreVersion:
    """Incremental mode: rank 0 adds the catalogue items the version lacks; other ranks wait."""
    store = Store(run_dir)
    name = None
    if processes.is_main:
        name = _add_new_items(config, run_dir, store, model, version, processes.device).name
    name = from_rank_zero(processes, name)
    return store.open(name)


def _add_new_items(config: MoonConfig, run_dir: Path, store: Store, model: str | None, version: str | None,
                   device: torch.device) -> StoreVersion:
    target = store.open(version) if version else store.latest()
    made_by = target.manifest
    path = resolve_model(run_dir, model)[1] if model else Path(made_by["model_dir"])
    if not (path / SETTINGS_FILE).is_file() or checkpoint_digest(path) != made_by["checkpoint_digest"]:
        raise UserError(f"{path} is not the model that made store version {target.name} (checkpoint "
                        f"{made_by['checkpoint_digest']}): pass --model with that model's directory, or run "
                        "`moon embed` without --incremental for a new version")
    ids = read_table(run_dir, "items", columns=["item_id"])["item_id"].to_pylist()
    new = np.flatnonzero(target.rows(ids) < 0)
    if len(new) == 0:
        ui.log(f"store version {target.name} already holds all {len(ids):,} catalogue items")
        return target
    rows = read_rows(dataset(run_dir, "items"), new)
    embedder = Embedder.load(path, device)
    started = time.perf_counter()
    with ui.progress(f"embed new items into {target.name}", len(new), unit="items") as advance:
        vectors = encode_items(embedder, ItemViews(rows), made_by["item_view"], config.store.batch_size, advance)
    ui.log(rate(len(new), time.perf_counter() - started))
    added = target.add(rows["item_id"].to_pylist(), vectors)
    ui.log(f"added {added:,} new items to {target.name} ({len(target):,} items)")
    return target


def resolve_model(run_dir: Path, model: str | None) -> tuple[str, Path]:
    """(label, directory) of the model to embed with: a stage of the run (default: the latest
    trained one) or a model directory."""
    run = RunDir(run_dir)
    if model is None:
        if (latest := run.latest_model()) is not None:
            return latest, run.model(latest)
        raise UserError(f"no trained model in {run.root / 'models'}: run `moon posttrain --stage 1` "
                        "(or `moon pretrain`) first, or pass --model DIR")
    if model in MODEL_STAGES:
        if not run.has_model(model):
            raise UserError(f"no {model} model in {run.model(model)}: train it first or pick another --model")
        return model, run.model(model)
    path = Path(model)
    if not (path / SETTINGS_FILE).is_file():
        raise UserError(f"--model {model} is neither a stage ({', '.join(MODEL_STAGES)}) "
                        f"nor a model directory (one with {SETTINGS_FILE})")
    return path.resolve().name, path


def make_plan(config: MoonConfig, run_dir: Path, label: str, path: Path, embedder: Embedder) -> dict:
    """What a version is made from: the weights, the catalogue, the view and the partitioning."""
    items_manifest = table_path(run_dir, "items") / MANIFEST
    return {
        "model": label,
        "model_dir": str(path.resolve()),
        "checkpoint_digest": checkpoint_digest(path),
        "dims": embedder.dim,
        "matryoshka_dims": list(embedder.settings.matryoshka_dims),
        "dtype": DTYPE,
        "item_view": embedder.settings.served_view,
        "bidirectional": embedder.settings.bidirectional,
        "partitions": config.store.partitions,
        "items": dataset(run_dir, "items").count_rows(),
        "items_digest": _digest(items_manifest.read_bytes()),  # a rewritten items table has a new manifest
    }


def encode_items(embedder: Embedder, views: ItemViews, view: str, batch_size: int, advance) -> np.ndarray:
    """Full-dimension, L2-normalised vectors of every item in `views`, float32 (items, dim)."""
    return embedder.encode(views.inputs(range(len(views)), view), batch_size=batch_size, advance=advance)


def read_rows(items: ds.Dataset, rows: np.ndarray):
    """The catalogue rows an item view needs, read for these rows only (images are the bulk)."""
    return items.take(rows, columns=ITEM_COLUMNS)


def from_rank_zero(processes: Processes, value):
    """Rank 0's `value` on every rank: one process decides, all follow."""
    if processes.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def progress(processes: Processes, description: str, total: int):
    """Rank 0's progress bar over its own share; other ranks work silently."""
    if processes.is_main:
        return ui.progress(description, total, unit="items")
    return nullcontext(lambda n=1: None)


def say(processes: Processes, message: str) -> None:
    """A log line from rank 0 only: every rank knows the same, one says it."""
    if processes.is_main:
        ui.log(message)


def rate(items: int, seconds: float) -> str:
    return f"embedded {items:,} items in {seconds:.1f}s ({items / max(seconds, 1e-9):,.0f} items/s)"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]
