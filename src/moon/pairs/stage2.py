"""Stage 2: cleaned purchase pairs (similarity dedup, SPU merge, category alignment, NER filter)
with hard negatives."""

from __future__ import annotations

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
from moon.pairs.log import Catalogue, session_photos, with_photos
from moon.pairs.stage1 import as_pairs
from moon.views import SERVED_VIEW


def similarity_embedder(settings: PairsConfig, items: pa.Table, interactions: pa.Table) -> BaselineEmbedder:
    """The embedder that judges query-item similarity for dedup and mining, fitted on the catalogue and queries."""
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
        as_pairs(purchases.filter(mask), f"{view}->{SERVED_VIEW}", settings) for view, mask in by_view.items()
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
