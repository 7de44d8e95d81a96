"""Stage 2: cleaned purchase pairs (similarity dedup, SPU merge, category alignment, NER filter)
with hard negatives."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from moon import ui
from moon.baseline import BaselineEmbedder
from moon.config import PairsConfig
from moon.errors import UserError
from moon.io.tables import read_manifest
from moon.pairs.entities import Gazetteer
from moon.pairs.log import INTERACTIONS, Catalogue, blocks, take_rows
from moon.pairs.stage1 import as_pairs
from moon.views import SERVED_VIEW

PURCHASE = {"action": "purchase", "image_query": pa.array([False, True])}  # after a search: text or photo
QUERY_COLUMNS = ["item_id", "query_text", "image_query", "photo"]
# Images described at once: the descriptor's temporaries take about 140 kB per image, and
# each image's vector is the same whatever else is described with it.
DESCRIBE_BLOCK = 512
MINING_BLOCK = 1024  # queries whose nearest items are scored at once (as one matrix product)


def similarity_embedder(settings: PairsConfig, items: pa.Table, queries: list[str]) -> BaselineEmbedder:
    """The embedder that judges query-item similarity for dedup and mining, fitted on the catalogue's
    texts (`items` need not hold the images) and the log's distinct query texts."""
    if settings.embedder != "baseline":
        raise UserError(
            f"pairs.embedder={settings.embedder!r}: only 'baseline' is available until a post-trained "
            "checkpoint exists (`moon posttrain`)"
        )
    return BaselineEmbedder.fit(items, extra_texts=queries)


def stage2_pairs(log, catalogue, duplicates, embedder, settings, rng, accounting, run_dir) -> Iterator[pa.Table]:
    """Cleaned purchase pairs: the text-query pairs, then the photo-query pairs, in time order.

    Similarity dedup streams the purchases and keeps at most one per item and query
    modality, so the steps after it hold a table (without photos) bounded by the
    catalogue; with dedup off, that table holds every purchase. Photos are read back only
    for the pairs kept.
    """
    total, count = log.count(), log.count(PURCHASE)
    accounting.record("stage 2", "purchases", total, count, **{"not a purchase": total - count})
    item_vectors = describe_catalogue(embedder, catalogue)
    if settings.dedup_similarity:
        rows = least_similar_queries(log, catalogue, embedder, item_vectors, count)
        accounting.record("stage 2", "similarity dedup", count, len(rows), **{"easier query, same item": count - len(rows)})
    else:
        rows = np.arange(count)
        accounting.record("stage 2", "similarity dedup (off)", count, count)
    purchases = read_purchases(log, catalogue, rows, settings.spu_merge)
    steps = [
        ("SPU merge", settings.spu_merge, spu_merge),
        ("category alignment", settings.category_alignment, lambda t: align_categories(t, catalogue, log.impressions, rng)),
        ("NER filter", settings.ner_filter,
         lambda t: ner_filter(t, gazetteer(run_dir, catalogue.items), catalogue.items, catalogue, settings.min_entities)),
    ]
    for name, enabled, step in steps:
        if not enabled:
            accounting.record("stage 2", f"{name} (off)", purchases.num_rows, purchases.num_rows)
            continue
        before = purchases.num_rows
        purchases, dropped = step(purchases)
        accounting.record("stage 2", name, before, purchases.num_rows, **dropped)
    negatives = hard_negatives(purchases, log, catalogue, duplicates, embedder, item_vectors, settings, rng)
    purchases = purchases.append_column("hard_neg_item_ids", negatives)
    accounting.record("stage 2", "hard negatives", purchases.num_rows, purchases.num_rows)
    text = purchases.filter(pc.invert(purchases["image_query"]))
    yield as_pairs(text, f"text->{SERVED_VIEW}", settings)
    for part in read_photos(log, purchases.filter(purchases["image_query"])):
        yield as_pairs(part, f"image->{SERVED_VIEW}", settings)


def purchases_of(log, columns: list[str]) -> Iterator[pa.Table]:
    """The purchases in time order; a purchase's row number in this stream is its `purchase_row`."""
    return log.scan(columns, PURCHASE)


def describe_catalogue(embedder, catalogue: Catalogue) -> np.ndarray:
    """The served view of every item, read and described a chunk at a time."""
    vectors = np.empty((len(catalogue.item_ids), embedder.dim), np.float32)
    columns = ["title", "category", "attributes", "image"]
    with ui.progress("describe catalogue", len(vectors), unit="items") as advance:
        start = 0
        for chunk in catalogue.chunks(columns, DESCRIBE_BLOCK):
            vectors[start:start + chunk.num_rows] = embedder.encode_items(chunk, SERVED_VIEW, advance)
            start += chunk.num_rows
    return vectors


def least_similar_queries(log, catalogue: Catalogue, embedder, item_vectors: np.ndarray, count: int) -> np.ndarray:
    """Similarity dedup: per (item, query modality), the purchase whose query the embedder finds least
    similar to the item (the hard, long-tail one; the earliest on a tie). Returns their purchase rows, sorted.

    The purchases stream through; only the best row so far of each (item, modality) is kept.
    """
    slots = 2 * len(catalogue.item_ids)  # item code * 2 + is photo query
    best_similarity = np.zeros(slots, np.float32)
    best_row = np.full(slots, -1, np.int64)
    offset = 0
    with ui.progress("describe purchase queries", count, unit="queries") as advance:
        for part in purchases_of(log, QUERY_COLUMNS):
            codes = catalogue.codes(part["item_id"])
            similarity = np.einsum("ij,ij->i", query_vectors(part, embedder), item_vectors[codes])
            slot = codes * 2 + part["image_query"].to_numpy(zero_copy_only=False)
            order = np.lexsort((similarity, slot))  # by slot, then least similar first, then earliest
            first = order[np.r_[True, slot[order][1:] != slot[order][:-1]]]
            better = (best_row[slot[first]] < 0) | (similarity[first] < best_similarity[slot[first]])
            best_similarity[slot[first[better]]] = similarity[first[better]]
            best_row[slot[first[better]]] = offset + first[better]
            offset += part.num_rows
            advance(part.num_rows)
    return np.sort(best_row[best_row >= 0])


def query_vectors(table: pa.Table, embedder) -> np.ndarray:
    """The embedder's vector of each row's query: its text, or its user photo."""
    vectors = np.zeros((table.num_rows, embedder.dim), np.float32)
    is_image = table["image_query"].to_numpy(zero_copy_only=False)
    if (~is_image).any():
        vectors[~is_image] = embedder.encode_texts(table.filter(pc.invert(table["image_query"]))["query_text"].to_pylist())
    photos, rows = table.filter(table["image_query"])["photo"], np.flatnonzero(is_image)
    for start in range(0, len(rows), DESCRIBE_BLOCK):
        vectors[rows[start:start + DESCRIBE_BLOCK]] = embedder.encode_images(photos.slice(start, DESCRIBE_BLOCK).to_pylist())
    return vectors


def read_purchases(log, catalogue: Catalogue, rows: np.ndarray, spu_merge: bool) -> pa.Table:
    """The purchases at `rows` without their photos, with `purchase_row` and `pos_spu_id` (the item's
    SPU, or the item itself when SKUs are not merged)."""
    columns = ["session_id", "item_id", "action", "ts", "user_id", "region", "query_text", "image_query", "split"]
    parts = list(take_rows(purchases_of(log, columns), rows))
    table = pa.concat_tables(parts) if parts else INTERACTIONS.empty_table().select(columns)
    spu = catalogue.spu[catalogue.codes(table["item_id"])] if spu_merge else table["item_id"].to_numpy(zero_copy_only=False)
    table = table.append_column("pos_spu_id", pa.array(spu.tolist(), pa.string()))
    return table.append_column("purchase_row", pa.array(rows, pa.int64()))


def read_photos(log, table: pa.Table) -> Iterator[pa.Table]:
    """`table` (purchases in time order) in parts, each with its rows' user photos (column `photo`)."""
    start = 0
    for photos in take_rows(purchases_of(log, ["photo"]), table["purchase_row"].to_numpy()):
        yield table.slice(start, photos.num_rows).append_column("photo", photos["photo"])
        start += photos.num_rows


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


def hard_negatives(table, log, catalogue, duplicates, embedder, item_vectors, settings, rng) -> pa.ListArray:
    """Per pair: same-leaf items of other SPUs, then the embedder's nearest items that are not positives.

    The queries are described again (photos read back for these pairs only), MINING_BLOCK at a time.
    """
    group = _duplicate_group(catalogue, duplicates)
    touched = _items_per_session(log, catalogue, pc.unique(table["session_id"]))
    by_leaf = {code: np.flatnonzero(catalogue.leaf == code) for code in np.unique(catalogue.leaf)}
    sessions = table["session_id"].to_pylist()

    def allowed(candidate: int, pos: int, excluded: set[int]) -> bool:
        return catalogue.spu[candidate] != catalogue.spu[pos] and group[candidate] != group[pos] and candidate not in excluded

    negatives = []
    queries = take_rows(purchases_of(log, QUERY_COLUMNS), table["purchase_row"].to_numpy())
    for block in blocks(queries, MINING_BLOCK):
        mined = _nearest_items(query_vectors(block, embedder), item_vectors, settings.mined_negatives + 32)
        for pos, nearest in zip(catalogue.codes(block["item_id"]), mined):
            excluded = set(touched.get(sessions[len(negatives)], ()))
            same_leaf = by_leaf[catalogue.leaf[pos]]
            pool = same_leaf[rng.permutation(len(same_leaf))[: 4 * settings.hard_negatives + 8]]
            chosen = [int(c) for c in pool if allowed(c, pos, excluded)][: settings.hard_negatives]
            chosen += [int(c) for c in nearest if allowed(c, pos, excluded) and c not in chosen][: settings.mined_negatives]
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


def _items_per_session(log, catalogue: Catalogue, sessions: pa.Array) -> dict[str, list[int]]:
    """The catalogue codes of the items each of `sessions` interacted with."""
    touched: dict[str, list[int]] = {}
    for part in log.scan(["session_id", "item_id"], {"session_id": sessions}):
        for session, item in zip(part["session_id"].to_pylist(), catalogue.codes(part["item_id"])):
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

