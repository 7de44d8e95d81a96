"""`moon simulate`: write a simulated world (or behaviour over a real catalogue) into a run directory.

Tables written: `items` (drawn catalogue; or the real catalogue with simulated launch
times where it had none), `item_truth`, `users`, `events`, `query_truth` (what each
distinct query was about, for the oracle) and `impression_truth` (the click model's terms
for each impression, for the ceilings). Items stream out in
chunks and events one simulated day at a time, so memory stays bounded however large
the world. Every manifest says what was simulated.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from moon import ui
from moon.config import MoonConfig, WorldConfig
from moon.errors import UserError
from moon.io import schema
from moon.io.tables import TableWriter, has_table, read_manifest, read_table, refuse_to_replace
from moon.sources.simulate import behaviour, market, vocab
from moon.sources.simulate.catalog import (
    COLOUR_NAMES,
    Catalog,
    build_catalog,
    item_id,
    items_table,
    unix_seconds,
)
from moon.sources.simulate.render import PATTERNS

SECTIONS = ("world", "behaviour")  # the config sections whose change makes a new world
OUTPUTS = ("items", "item_truth", "users", "events", "query_truth", "impression_truth")


def simulate(config: MoonConfig, run_dir: Path, replace_ingested: bool = False) -> dict:
    """Simulates into run_dir and returns the counts and seconds of each part.

    A table a user brought in (an ingested catalogue or log) is never replaced unless
    `replace_ingested` says so: the ingested catalogue of this very run directory is kept
    when behaviour is simulated over it (`behaviour.catalog` naming the run directory).
    """
    if not replace_ingested:
        refuse_to_replace_ingested(config, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    common = {"stage": "simulate", "config_digest": config.digest(*SECTIONS), "seed": config.seed}
    if config.behaviour.catalog:
        shop = _real_market(config, run_dir, common)
        source = {"catalog": str(Path(config.behaviour.catalog).resolve())}
    else:
        shop = _drawn_world(config, run_dir, common)
        source = {"catalog": None}
    items_seconds = time.perf_counter() - started
    users = behaviour.make_users(shop, config.behaviour, config.seed)
    with TableWriter(run_dir, "users", schema.USERS) as writer:
        writer.write(behaviour.users_table(users, shop))
        writer.commit(**common, **source, simulated=True)
    events = _write_events(shop, users, config, run_dir, {**common, **source})
    seconds = time.perf_counter() - started
    return {"items": len(shop), "events": events, "users": len(users), "items_seconds": items_seconds, "seconds": seconds}


def refuse_to_replace_ingested(config: MoonConfig, run_dir: Path) -> None:
    catalog = config.behaviour.catalog
    over_itself = catalog is not None and Path(catalog).resolve() == Path(run_dir).resolve()
    instead = (f"set behaviour.catalog={run_dir} (`moon simulate --catalog {run_dir}`) to simulate behaviour "
               "over that catalogue, or use another --run-dir; --replace-ingested discards it")
    for table in OUTPUTS:
        if not (table == "items" and over_itself):  # simulating over it keeps every real column
            refuse_to_replace(run_dir, table, "simulate", instead)


def _drawn_world(config: MoonConfig, run_dir: Path, common: dict) -> market.Market:
    world = config.world
    catalog = build_catalog(world, config.behaviour, config.seed)
    with TableWriter(run_dir, "items", schema.ITEMS) as writer, ui.progress("draw catalogue", len(catalog)) as advance:
        for chunk in _drawn_chunks(catalog, world):
            writer.write(chunk)
            advance(chunk.num_rows)
        writer.commit(**common, simulated=True, simulated_columns="all", lexicon=vocab.lexicon())
    with TableWriter(run_dir, "item_truth", schema.ITEM_TRUTH) as writer:
        writer.write(_world_truth(catalog))
        writer.commit(**common, simulated=True)
    return market.from_world(catalog, world.image_size)


def _drawn_chunks(catalog: Catalog, world: WorldConfig) -> Iterator[pa.Table]:
    """Chunks of the items table in order; drawn by a pool of processes when there are several.

    Each chunk is a pure function of the catalogue, so the pool changes only the speed.
    At most two chunks per worker are in flight, which bounds memory.
    """
    bounds = [(start, min(start + world.chunk_items, len(catalog))) for start in range(0, len(catalog), world.chunk_items)]
    workers = min(world.workers or os.cpu_count() or 1, len(bounds))
    if workers <= 1:
        yield from (items_table(catalog, start, stop, world) for start, stop in bounds)
        return
    # spawn, not fork: the parent runs a progress-bar thread, and forking a threaded process is unsafe.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(catalog, world)) as pool:
        pending: deque = deque()
        for chunk_bounds in bounds:
            pending.append(pool.submit(_draw_chunk, chunk_bounds))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


_worker_state: tuple[Catalog, WorldConfig] | None = None


def _start_worker(catalog: Catalog, world: WorldConfig) -> None:
    global _worker_state
    _worker_state = (catalog, world)


def _draw_chunk(bounds: tuple[int, int]) -> pa.Table:
    catalog, world = _worker_state
    return items_table(catalog, *bounds, world)


def _world_truth(catalog: Catalog) -> pa.Table:
    return pa.table(
        {
            "item_id": item_id(np.arange(len(catalog))),
            "style": list(catalog.style),
            "pattern": np.array(PATTERNS)[catalog.pattern],
            "colour": np.array(COLOUR_NAMES)[catalog.colour],
            "brand": np.array([b.name for b in catalog.brands])[catalog.brand],
            "price_band": catalog.price_band,
            "is_new": catalog.is_new,
        },
        schema=schema.ITEM_TRUTH,
    )


def _real_market(config: MoonConfig, run_dir: Path, common: dict) -> market.Market:
    """Behaviour over an ingested catalogue: its real categories, colours, titles and images."""
    catalog_dir = Path(config.behaviour.catalog)
    if not has_table(catalog_dir, "items"):
        raise UserError(
            f"--catalog {catalog_dir} holds no items table: run `moon ingest SOURCE --run-dir {catalog_dir}` first"
        )
    ingested = read_manifest(catalog_dir, "items")
    if ingested.get("simulated") is True:
        raise UserError(f"--catalog {catalog_dir} holds a simulated catalogue; point it at an ingested one")
    items = read_table(catalog_dir, "items")
    if ingested.get("simulated_created_at_rows") == items.num_rows:  # filled in by an earlier simulation
        items = items.set_column(items.schema.get_field_index("created_at"), "created_at", pa.nulls(items.num_rows, schema.TIMESTAMP))
    ingested = ingested.get("ingest", ingested)
    b = config.behaviour
    shop = market.from_items(items, config.world.new_item_share, b.start_date, b.days, config.seed)
    had_time = ~pc.is_null(items.column("created_at")).to_numpy(zero_copy_only=False)
    launched = pa.array((shop.created_at * 1000).astype("datetime64[ms]"), type=schema.TIMESTAMP)
    items = items.set_column(items.schema.get_field_index("created_at"), "created_at", launched)
    with TableWriter(run_dir, "items", schema.ITEMS) as writer:
        for start in range(0, items.num_rows, config.ingest.shard_rows):
            writer.write(items.slice(start, config.ingest.shard_rows))
        # Keep what made the real catalogue, and say which columns the simulator filled in.
        writer.commit(
            **common,
            ingest=ingested,
            catalog=str(catalog_dir.resolve()),
            simulated=False,
            simulated_columns=["created_at"] if not had_time.all() else [],
            simulated_created_at_rows=int((~had_time).sum()),
        )
    start = unix_seconds(b.start_date)
    with TableWriter(run_dir, "item_truth", schema.ITEM_TRUTH) as writer:
        writer.write(
            {
                "item_id": shop.item_ids,
                "style": list(shop.style),
                "pattern": pa.nulls(len(shop), pa.string()),
                "colour": [shop.colour_words[c][0] if c >= 0 else None for c in shop.colour],
                "brand": [shop.brand_words[c] if c >= 0 else None for c in shop.brand],
                "price_band": pa.array(shop.price_band, mask=shop.price_band < 0),
                "is_new": shop.created_at >= start,
            }
        )
        writer.commit(**common, simulated=True, style="the silhouette of the real images (sources/simulate/market.py, measure_looks)")
    return shop


def _write_events(shop: market.Market, users, config: MoonConfig, run_dir: Path, manifest: dict) -> int:
    sessions = behaviour.Sessions(shop, users, config.behaviour, config.seed)
    b = config.behaviour
    seen: set[str] = set()  # queries whose truth is written (a query searched again is written once)
    with (TableWriter(run_dir, "events", schema.EVENTS) as writer,
          TableWriter(run_dir, "query_truth", schema.QUERY_TRUTH) as truth_writer,
          TableWriter(run_dir, "impression_truth", schema.IMPRESSION_TRUTH) as shown_writer,
          ui.progress("simulate sessions", sessions.total_sessions(), unit="sessions") as advance):
        for day in range(b.days):
            events, truths, shown = sessions.day(day, advance)
            writer.write(events)
            truth_writer.write(truths.take(_first_seen(truths["query_id"].to_pylist(), seen)))
            shown_writer.write(shown)
        writer.commit(**manifest, simulated=True, period_start=b.start_date.isoformat(), days=b.days)
        truth_writer.commit(**manifest, simulated=True)
        shown_writer.commit(**manifest, simulated=True, click_model=_click_model(b))
    return writer.rows


def _click_model(b) -> dict:
    return {key: getattr(b, key) for key in ("position_decay", "click_bias", "relevance_weight", "taste_weight",
                                             "appeal_weight", "appeal_visible_share")}


def _first_seen(ids: list[str], seen: set[str]) -> list[int]:
    """Rows of ids not in `seen` (each once), which are added to it."""
    rows = []
    for row, key in enumerate(ids):
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows
