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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from moon import ui
from moon.config import MoonConfig, PairsConfig
from moon.io import schema
from moon.pairs.accounting import Accounting, Step
from moon.baseline.embedder import BaselineEmbedder
from moon.pairs.duplicates import near_duplicate_groups
from moon.pairs.entities import Gazetteer
from moon.sources.summary import leaf_categories
from moon.io.tables import TableWriter, dataset, read_manifest, read_table
from moon.errors import UserError
from moon.run import RunDir
from moon.views import SERVED_VIEW

SECTIONS = ("world", "behaviour", "ingest", "pairs")  # the pairs, and what made the log they read
OUTPUTS = ("pairs_stage1", "pairs_stage2", "eval_image_search", "near_duplicates")
ACTION_RANK = {"click": 1, "cart": 2, "purchase": 3}
ITEM_QUERY_VIEWS = ("title+image", "richer-text+image")  # views an item-as-query pair may take
MS_PER_DAY = 86_400_000
READAHEAD = {"batch_readahead": 2, "fragment_readahead": 1}  # bounds memory: photo batches are large


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
    embedder = load_embedder(settings, items, log.interactions)
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


# ---------------------------------------------------------------- the catalogue and the log


@dataclass
class Catalogue:
    """Per-item facts the pair builder needs, indexed by item id."""

    ids: pa.Array  # string, for vectorised lookups
    item_ids: np.ndarray  # object: str
    spu: np.ndarray  # object: str
    leaf: np.ndarray  # int: leaf category code

    @classmethod
    def of(cls, items: pa.Table) -> Catalogue:
        ids = np.array(items["item_id"].to_pylist(), dtype=object)
        _, leaf = np.unique(leaf_categories(items["category"]).to_numpy(zero_copy_only=False), return_inverse=True)
        spu = np.array(items["spu_id"].to_pylist(), dtype=object)
        return cls(items["item_id"].combine_chunks(), ids, spu, leaf)

    def codes(self, item_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Catalogue positions of item ids; an id the catalogue lacks is a user error."""
        codes = pc.index_in(item_ids, value_set=self.ids)
        if codes.null_count:
            missing = pc.filter(item_ids, pc.is_null(codes))[0]
            raise UserError(
                f"the behaviour log names item {missing} that the items table lacks: ingest or simulate "
                "the catalogue and the log into the same run directory"
            )
        return codes.to_numpy(zero_copy_only=False).astype(np.int64)


@dataclass
class BehaviourLog:
    interactions: pa.Table  # one row per (session, item): strongest action, split, query text
    impressions: np.ndarray  # impressions per catalogue item
    period_start_ms: int
    days: int


INTERACTION_COLUMNS = ["ts", "user_id", "session_id", "region", "query_text", "item_id", "action"]


def read_interactions(run_dir: Path, settings: PairsConfig, catalogue: Catalogue, accounting: Accounting) -> BehaviourLog:
    """Streams the events (without the photo bytes) and keeps one interaction per (session, item).

    A session searched with a photo exactly when its query text is null (the events contract),
    so the photo column is not read here.
    """
    manifest = read_manifest(run_dir, "events")
    events = dataset(run_dir, "events")
    impressions = np.zeros(len(catalogue.item_ids), dtype=np.int64)
    kept: list[pa.Table] = []
    total = events.count_rows()
    with ui.progress("read behaviour log", total, unit="events") as advance:
        for batch in events.to_batches(columns=INTERACTION_COLUMNS, batch_size=settings.batch_rows, **READAHEAD):
            table = pa.Table.from_batches([batch])
            shown = pc.equal(table["action"], "impression")
            impressions += np.bincount(catalogue.codes(table.filter(shown)["item_id"]), minlength=len(impressions))
            acted = table.filter(pc.invert(shown))
            kept.append(acted.append_column("image_query", pc.is_null(acted["query_text"])))
            advance(batch.num_rows)
    rows = pa.concat_tables(kept) if kept else pa.table({c: [] for c in INTERACTION_COLUMNS})
    interactions = strongest_per_session_item(rows)
    accounting.record(
        "interactions", "one per (session, item)", rows.num_rows, interactions.num_rows,
        **{"weaker action, same session and item": rows.num_rows - interactions.num_rows},
    )
    start_ms = int(np.datetime64(manifest["period_start"], "ms").astype(np.int64))
    interactions = assign_splits(interactions, start_ms, int(manifest["days"]), settings)
    return BehaviourLog(interactions, impressions, start_ms, int(manifest["days"]))


def strongest_per_session_item(rows: pa.Table) -> pa.Table:
    """One row per (session, item), with its strongest action and the time of its first action."""
    rank = pc.add(pc.index_in(rows["action"], value_set=pa.array(list(ACTION_RANK))), 1)
    rows = rows.append_column("rank", rank)
    grouped = rows.group_by(["session_id", "item_id"], use_threads=False).aggregate(
        [("rank", "max"), ("ts", "min"), ("user_id", "first"), ("region", "first"),
         ("query_text", "first"), ("image_query", "first")]
    )
    action = pa.array(list(ACTION_RANK)).take(pc.subtract(grouped["rank_max"], 1))
    table = pa.table({
        "session_id": grouped["session_id"],
        "item_id": grouped["item_id"],
        "action": action,
        "ts": grouped["ts_min"],
        "user_id": grouped["user_id_first"],
        "region": grouped["region_first"],
        "query_text": grouped["query_text_first"],
        "image_query": grouped["image_query_first"],
    })
    return table.sort_by([("ts", "ascending"), ("session_id", "ascending"), ("item_id", "ascending")])


def assign_splits(interactions: pa.Table, start_ms: int, days: int, settings: PairsConfig) -> pa.Table:
    """train / valid / test by event day: evaluation comes from later days than any training pair."""
    if settings.test_days + settings.valid_days >= days:
        raise UserError(
            f"the log has {days} days but pairs.test_days={settings.test_days} and pairs.valid_days="
            f"{settings.valid_days} leave none for training: lower them or simulate more days"
        )
    day = (interactions["ts"].cast(pa.int64()).to_numpy() - start_ms) // MS_PER_DAY
    test_from = days - settings.test_days
    valid_from = test_from - settings.valid_days
    split = np.where(day >= test_from, "test", np.where(day >= valid_from, "valid", "train"))
    return interactions.append_column("split", pa.array(split, pa.string()))


# ---------------------------------------------------------------- stage 1


def stage1_candidates(log: BehaviourLog) -> dict[str, pa.Table]:
    """Every candidate pair of every task, before the mix is applied."""
    acts = log.interactions
    text = acts.filter(pc.invert(acts["image_query"]))
    image = acts.filter(acts["image_query"])
    item_pairs = _items_of_one_session(acts)
    candidates = {}
    for task in schema.TASKS:
        query_view, item_view = task.split("->")
        source = {"text": text, "image": image}.get(query_view, item_pairs)
        candidates[task] = source
    return candidates


def _items_of_one_session(acts: pa.Table) -> pa.Table:
    """Ordered (earlier item -> later item) pairs of items one session interacted with."""
    left = acts.select(["session_id", "item_id", "ts"]).rename_columns(["session_id", "query_item_id", "query_ts"])
    joined = left.join(acts, keys="session_id", join_type="inner", use_threads=False)
    later = pc.or_(
        pc.less(joined["query_ts"], joined["ts"]),
        pc.and_(pc.equal(joined["query_ts"], joined["ts"]), pc.less(joined["query_item_id"], joined["item_id"])),
    )
    pairs = joined.filter(pc.and_(pc.not_equal(joined["query_item_id"], joined["item_id"]), later))
    return pairs.sort_by([("ts", "ascending"), ("session_id", "ascending"), ("query_item_id", "ascending"), ("item_id", "ascending")])


def mix_quotas(available: dict[str, int], mix: dict[str, float]) -> dict[str, int]:
    """Pairs per task in proportion to the mix, as many as the scarcest task allows.

    Tasks the log cannot feed at all (e.g. image tasks of a text-only log) are left out
    of the scale, so they do not empty the others.
    """
    shares = {task: share for task, share in mix.items() if share > 0 and available.get(task, 0) > 0}
    if not shares:
        return {task: 0 for task in schema.TASKS}
    scale = min(available[task] / share for task, share in shares.items())
    return {task: min(available.get(task, 0), int(round(mix.get(task, 0) * scale))) for task in schema.TASKS}


def stage1_pairs(log: BehaviourLog, settings: PairsConfig, rng, accounting: Accounting, run_dir: Path) -> Iterator[pa.Table]:
    """The pairs of each task in turn, so that only one task's photos are in memory at a time."""
    candidates = stage1_candidates(log)
    quotas = mix_quotas({task: table.num_rows for task, table in candidates.items()}, settings.mix)
    sampled = {}
    for task, table in candidates.items():
        keep = np.sort(rng.choice(table.num_rows, quotas[task], replace=False))
        accounting.record(
            "stage 1", task, table.num_rows, len(keep),
            **{"beyond the task's mix share": table.num_rows - len(keep)},
        )
        sampled[task] = table.take(keep)
    image_tasks = [task for task in sampled if task.startswith("image->")]
    sessions = pc.unique(pa.chunked_array([sampled[t]["session_id"] for t in image_tasks], pa.string()))
    photos = session_photos(run_dir, sessions, settings)
    for task in list(sampled):
        table = sampled.pop(task)
        yield _as_pairs(with_photos(table, photos) if task in image_tasks else table, task, settings)


def with_photos(table: pa.Table, photos: pa.Table) -> pa.Table:
    """Adds each row's user photo (column `photo`), keeping the time order."""
    joined = table.join(photos, keys="session_id", join_type="left outer", use_threads=False)
    order = [("ts", "ascending"), ("session_id", "ascending"), ("item_id", "ascending")]
    return joined.sort_by(order)


def _as_pairs(table: pa.Table, task: str, settings: PairsConfig) -> pa.Table:
    """Rows of the pairs table; optional columns of `table`: photo, pos_spu_id, hard_neg_item_ids."""
    query_view, item_view = task.split("->")
    n = table.num_rows
    weights = np.array([settings.action_weights.get(a, 1.0) for a in table["action"].to_pylist()], np.float32)
    columns = {
        "task": pa.array([task] * n),
        "query_view": pa.array([query_view] * n),
        "query_text": table["query_text"] if query_view == "text" else pa.nulls(n, pa.string()),
        "query_image": table["photo"] if query_view == "image" else pa.nulls(n, pa.binary()),
        "query_item_id": table["query_item_id"] if query_view in ITEM_QUERY_VIEWS else pa.nulls(n, pa.string()),
        "pos_item_id": table["item_id"],
        "pos_spu_id": table["pos_spu_id"] if "pos_spu_id" in table.column_names else table["item_id"],
        "item_view": pa.array([item_view] * n),
        "hard_neg_item_ids": (
            table["hard_neg_item_ids"] if "hard_neg_item_ids" in table.column_names
            else pa.array([[]] * n, pa.list_(pa.string()))
        ),
        "action": table["action"],
        "weight": weights,
        "ts": table["ts"],
        "region": table["region"],
        "user_id": table["user_id"],
        "session_id": table["session_id"],
        "split": table["split"],
    }
    return pa.table(columns, schema=schema.PAIRS)


def session_photos(run_dir: Path, sessions: pa.Array, settings: PairsConfig) -> pa.Table:
    """(session_id, photo) for the given sessions, read from the events in streamed batches.

    Each photo is copied once, from the first row of its session; the parts are then
    concatenated without copying, so memory holds the wanted photos and one batch.
    """
    photo_schema = pa.schema([("session_id", pa.string()), ("photo", pa.binary())])
    parts = [photo_schema.empty_table()]
    seen: set[str] = set()
    events = dataset(run_dir, "events")
    wanted = pc.field("session_id").isin(sessions) & pc.field("query_image").is_valid()
    batches = events.to_batches(columns=["session_id", "query_image"], filter=wanted, batch_size=settings.batch_rows, **READAHEAD)
    for batch in batches:
        first_rows = []
        for row, session in enumerate(batch.column("session_id").to_pylist()):
            if session not in seen:
                seen.add(session)
                first_rows.append(row)
        rows = pa.array(first_rows, pa.int64())
        parts.append(pa.Table.from_batches([batch]).take(rows).rename_columns(photo_schema.names).cast(photo_schema))
    return pa.concat_tables(parts)


# ---------------------------------------------------------------- stage 2


def load_embedder(settings: PairsConfig, items: pa.Table, interactions: pa.Table):
    if settings.embedder != "baseline":
        raise UserError(
            f"pairs.embedder={settings.embedder!r}: only 'baseline' is available until a post-trained "
            "checkpoint exists (`moon posttrain`)"
        )
    queries = interactions["query_text"].drop_null().unique().to_pylist()
    return BaselineEmbedder.fit(items, extra_texts=queries)


def stage2_pairs(log, catalogue, duplicates, embedder, settings, rng, accounting, run_dir, items) -> pa.Table:
    acts = log.interactions
    purchases = acts.filter(pc.equal(acts["action"], "purchase"))
    accounting.record("stage 2", "purchases", acts.num_rows, purchases.num_rows, **{"not a purchase": acts.num_rows - purchases.num_rows})
    photos = session_photos(run_dir, pc.unique(purchases.filter(purchases["image_query"])["session_id"]), settings)
    purchases = with_photos(purchases, photos)
    codes = catalogue.codes(purchases["item_id"])
    purchases = purchases.append_column("pos_spu_id", pa.array(catalogue.spu[codes].tolist(), pa.string()))
    with ui.progress("describe catalogue", items.num_rows, unit="items") as advance:
        item_vectors = embedder.encode_items(items, SERVED_VIEW, advance)
    # Every purchase's query is embedded once; the steps below look rows up by `query_row`.
    query_vecs = query_vectors(purchases, embedder)
    purchases = purchases.append_column("query_row", pa.array(np.arange(purchases.num_rows)))

    steps = [
        ("similarity dedup", settings.dedup_similarity, lambda t: dedup_by_similarity(t, catalogue, query_vecs, item_vectors)),
        ("SPU merge", settings.spu_merge, spu_merge),
        ("category alignment", settings.category_alignment, lambda t: align_categories(t, catalogue, log.impressions, rng)),
        ("NER filter", settings.ner_filter, lambda t: ner_filter(t, gazetteer(run_dir, items), items, catalogue, settings.min_entities)),
    ]
    if not settings.spu_merge:  # each SKU is its own target
        purchases = purchases.set_column(purchases.schema.get_field_index("pos_spu_id"), "pos_spu_id", purchases["item_id"])
    for name, enabled, step in steps:
        if not enabled:
            accounting.record("stage 2", f"{name} (off)", purchases.num_rows, purchases.num_rows)
            continue
        before = purchases.num_rows
        purchases, dropped = step(purchases)
        accounting.record("stage 2", name, before, purchases.num_rows, **dropped)
    negatives = hard_negatives(purchases, catalogue, duplicates, query_vecs, item_vectors, log.interactions, settings, rng)
    purchases = purchases.append_column("hard_neg_item_ids", negatives)
    accounting.record("stage 2", "hard negatives", purchases.num_rows, purchases.num_rows)
    by_view = {"text": pc.invert(purchases["image_query"]), "image": purchases["image_query"]}
    return pa.concat_tables(
        _as_pairs(purchases.filter(mask), f"{view}->{SERVED_VIEW}", settings) for view, mask in by_view.items()
    )


def query_vectors(table: pa.Table, embedder) -> np.ndarray:
    """The embedder's vector of each row's query: its text, or its user photo."""
    vectors = np.zeros((table.num_rows, embedder.dim), np.float32)
    is_image = table["image_query"].to_numpy(zero_copy_only=False)
    if (~is_image).any():
        vectors[~is_image] = embedder.encode_texts(table.filter(pc.invert(table["image_query"]))["query_text"].to_pylist())
    if is_image.any():
        vectors[is_image] = embedder.encode_images(table.filter(table["image_query"])["photo"].to_pylist())
    return vectors


def dedup_by_similarity(table: pa.Table, catalogue: Catalogue, query_vecs: np.ndarray, item_vectors: np.ndarray):
    """Per (item, query modality), keep the query least similar to the item: the hard, long-tail one."""
    queries = query_vecs[table["query_row"].to_numpy()]
    similarity = np.einsum("ij,ij->i", queries, item_vectors[catalogue.codes(table["item_id"])])
    keys = np.array([f"{item}|{image}" for item, image in zip(table["item_id"].to_pylist(), table["image_query"].to_pylist())])
    order = np.lexsort((similarity, keys))  # by key, then least similar first
    first = np.ones(len(order), bool)
    first[1:] = keys[order][1:] != keys[order][:-1]
    keep = np.sort(order[first])
    return table.take(keep), {"easier query, same item": table.num_rows - len(keep)}


def spu_merge(table: pa.Table):
    """One pair per query and SPU: the same query buying sibling SKUs is one positive, not two."""
    texts = [" ".join((t or "").lower().split()) for t in table["query_text"].to_pylist()]
    query_key = [f"s:{s}" if image else f"t:{t}" for s, t, image in zip(table["session_id"].to_pylist(), texts, table["image_query"].to_pylist())]
    keys = np.array([f"{q}|{spu}" for q, spu in zip(query_key, table["pos_spu_id"].to_pylist())])
    _, first = np.unique(keys, return_index=True)  # rows are time-ordered: keeps the earliest
    keep = np.sort(first)
    return table.take(keep), {"same query, same SPU": table.num_rows - len(keep)}


def align_categories(table: pa.Table, catalogue: Catalogue, impressions: np.ndarray, rng: np.random.Generator):
    """Down-samples leaves whose share of pairs exceeds their share of impressions, to that share."""
    leaf = catalogue.leaf[catalogue.codes(table["item_id"])]
    exposure = np.bincount(catalogue.leaf, weights=impressions, minlength=catalogue.leaf.max() + 1)
    exposure = exposure / max(exposure.sum(), 1)
    keep = []
    for code in np.unique(leaf):
        rows = np.flatnonzero(leaf == code)
        target = max(1, int(np.ceil(exposure[code] * table.num_rows)))
        keep.append(rows if len(rows) <= target else rng.choice(rows, target, replace=False))
    kept = np.sort(np.concatenate(keep)) if keep else np.array([], np.int64)
    return table.take(kept), {"leaf over-exposed vs impressions": table.num_rows - len(kept)}


def gazetteer(run_dir: Path, items: pa.Table) -> Gazetteer:
    """The catalogue's dictionary, with the words its source recorded (the simulator's synonyms)."""
    return Gazetteer.from_items(items, read_manifest(run_dir, "items").get("lexicon"))


def ner_filter(table: pa.Table, gazetteer: Gazetteer, items: pa.Table, catalogue: Catalogue, min_entities: int):
    """Drops pairs whose query text or item title names fewer than `min_entities` entities."""
    titles = np.array(items["title"].to_pylist(), dtype=object)[catalogue.codes(table["item_id"])]
    title_ok = gazetteer.count(titles.tolist()) >= min_entities
    is_text = pc.invert(table["image_query"]).to_numpy(zero_copy_only=False)
    query_ok = ~is_text | (gazetteer.count(table["query_text"].to_pylist()) >= min_entities)
    keep = title_ok & query_ok
    dropped = {
        f"query < {min_entities} entities": int((~query_ok).sum()),
        f"title < {min_entities} entities": int((query_ok & ~title_ok).sum()),
    }
    return table.filter(pa.array(keep)), dropped


def hard_negatives(table, catalogue, duplicates, query_vecs, item_vectors, interactions, settings, rng) -> pa.ListArray:
    """Per pair: same-leaf items of other SPUs, then the embedder's nearest items that are not positives."""
    group = _duplicate_group(catalogue, duplicates)
    touched = _items_per_session(interactions, catalogue)
    by_leaf = {code: np.flatnonzero(catalogue.leaf == code) for code in np.unique(catalogue.leaf)}
    positives = catalogue.codes(table["item_id"])
    mined = _nearest_items(query_vecs[table["query_row"].to_numpy()], item_vectors, settings.mined_negatives + 32)
    negatives = []
    for row, (pos, session) in enumerate(zip(positives, table["session_id"].to_pylist())):
        excluded = set(touched.get(session, ()))

        def allowed(candidate: int) -> bool:
            return (catalogue.spu[candidate] != catalogue.spu[pos] and group[candidate] != group[pos]
                    and candidate not in excluded)

        same_leaf = by_leaf[catalogue.leaf[pos]]
        pool = same_leaf[rng.permutation(len(same_leaf))[: 4 * settings.hard_negatives + 8]]
        chosen = [int(c) for c in pool if allowed(c)][: settings.hard_negatives]
        chosen += [int(c) for c in mined[row] if allowed(c) and c not in chosen][: settings.mined_negatives]
        negatives.append(catalogue.item_ids[chosen].tolist())
    return pa.array(negatives, pa.list_(pa.string()))


def _duplicate_group(catalogue: Catalogue, duplicates: pa.Table) -> np.ndarray:
    """A group code per item: its near-duplicate group, or itself."""
    group = np.arange(len(catalogue.item_ids))
    if duplicates.num_rows:
        members = catalogue.codes(duplicates["item_id"])
        leaders = catalogue.codes(duplicates["group_id"])
        group[members] = leaders
    return group


def _items_per_session(interactions: pa.Table, catalogue: Catalogue) -> dict[str, list[int]]:
    touched: dict[str, list[int]] = {}
    for session, item in zip(interactions["session_id"].to_pylist(), catalogue.codes(interactions["item_id"])):
        touched.setdefault(session, []).append(int(item))
    return touched


def _nearest_items(queries: np.ndarray, items: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """Exact top-k items by inner product, chunked over queries."""
    k = min(k, len(items))
    out = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), chunk):
        scores = queries[start:start + chunk] @ items.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        out[start:start + chunk] = np.take_along_axis(top, order, axis=1)
    return out


# ---------------------------------------------------------------- evaluation set


def image_search_eval_set(log, catalogue, run_dir, settings, accounting) -> pa.Table:
    """Every (user photo, purchased item) of the test days: the input of image-based search recall."""
    acts = log.interactions
    test = acts.filter(pc.equal(acts["split"], "test"))
    chosen = test.filter(pc.and_(test["image_query"], pc.equal(test["action"], "purchase")))
    accounting.record(
        "evaluation", "test days: photo query + purchase", test.num_rows, chosen.num_rows,
        **{"text query": int(pc.sum(pc.invert(test["image_query"])).as_py() or 0),
           "photo query, no purchase": int(pc.sum(test["image_query"]).as_py() or 0) - chosen.num_rows},
    )
    chosen = with_photos(chosen, session_photos(run_dir, pc.unique(chosen["session_id"]), settings))
    spu = catalogue.spu[catalogue.codes(chosen["item_id"])].tolist()
    return pa.table(
        {
            "query_id": chosen["session_id"],
            "query_image": chosen["photo"],
            "item_id": chosen["item_id"],
            "spu_id": pa.array(spu, pa.string()),
            "ts": chosen["ts"],
            "region": chosen["region"],
            "user_id": chosen["user_id"],
        },
        schema=schema.EVAL_IMAGE_SEARCH,
    )
