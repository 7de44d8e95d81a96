"""`moon eval retrieval`: retrieval recall of every model of a run (docs/metrics.md).

The held-out user photos of `eval_image_search` search the whole catalogue (image-based
search, the guiding metric); the photos whose session bought the item are reported again
as the purchase subset. Beside it, two more query sets from the same split of the
pair tables: text queries, each with every item its session engaged with after it (text
search), and items as queries, each with the items its session engaged with after it
(item -> item, the query item left out of its own ranking). When the run holds a labelled
query set a user brought in (`moon ingest-queries`), its test split adds two more: its
photos (labelled image search) and its texts (labelled text search), each query with every
item the people who labelled it judged a hit. Every model the run has is
measured on the same queries: the non-learned baseline, the untrained backbone, the
pretrained model, and the stage-1 and stage-2 embedders, at every Matryoshka dimension;
plus, for image search, a hard set where each query's distractors are only the items of
its target's leaf category. Each model is scored on items in the view it serves, and its
catalogue vectors come from a store version it made when one holds every item.

Every model but the baseline also gets its paired difference from the baseline on each
query set (`vs_baseline`: per K, the mean of the per-query differences of hits, with a 95%
bootstrap interval over the queries), which is what "beats the baseline" means here; and
stage 2 its paired difference from stage 1 (`vs_stage1`): what the second stage adds.

Every query set is of one split: the test days by default; `--split valid` measures on the
valid days instead, where choices of recipe are made without looking at the test days (a
labelled set has no valid split: its test queries are kept for the test days' evaluation).

Results go to `eval/retrieval.json` (`eval/retrieval-valid.json` for the valid days); what each
model found for each test-day image-search query (its top `PREDICTED_K` item ids and scores)
goes to `eval/predictions/<model>.parquet`, which the report's gallery shows.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from moon import ui
from moon.baseline import BaselineEmbedder
from moon.config import MoonConfig
from moon.eval.metrics import (
    bootstrap_ci,
    recall_at_k,
    relevant_items,
    relevant_sets,
    retrieval_recall,
)
from moon.io.atomic import atomic_json, atomic_parquet
from moon.errors import UserError
from moon.io.tables import has_table, read_table
from moon.model.embedder import Embedder
from moon.model.inputs import Input
from moon.model.views import ItemViews
from moon.pairs.eval_set import eval_photos
from moon.pairs.stage1 import ITEM_QUERY_VIEWS
from moon.queries import query_id
from moon.run import RunDir
from moon.store.versions import Store
from moon.vectors import prefix
from moon.views import SERVED_VIEW

HARD_K = 10
IMAGE_SEARCH = "image_search"  # the key of the whole photo set's per-query hits
PURCHASED = "purchase_subset"  # the photos whose session bought the item
REFERENCE = "baseline"  # every model's paired difference is read against the non-learned baseline
PREDICTED_K = 10  # results saved per image-search query and model
PAIR_TABLES = ("pairs_stage1", "pairs_stage2")  # where held-out text and item queries come from
LABELLED_TABLE = "labelled_queries"


@dataclass(frozen=True)
class HeldOut:
    """One split's queries of one kind, each with the items its session engaged with after it."""

    queries: list  # the query text, the query item's id, or a labelled query's photo
    targets: list[list[str]]  # item ids clicked, carted or bought after the query (or judged hits), sorted

    def __len__(self) -> int:
        return len(self.queries)


@dataclass(frozen=True)
class Vectors:
    """One model's vectors of every query set and of the catalogue."""

    photos: np.ndarray
    texts: np.ndarray
    items: np.ndarray
    dims: list[int] | None  # Matryoshka dims to score; None: the full vector only
    item_view: str = SERVED_VIEW  # the view the catalogue is seen in
    source: str = "encoded by moon eval retrieval"  # where the catalogue vectors came from
    # The labelled set's test photos and texts; None where not encoded (no labelled set, or a store
    # version, which holds only the log's queries)
    labelled_photos: np.ndarray | None = None
    labelled_texts: np.ndarray | None = None


@dataclass(frozen=True)
class QuerySets:
    """The held-out query sets every model is measured on, with what counts as a hit."""

    items: pa.Table
    views: ItemViews
    photo_query_ids: pa.ChunkedArray  # eval_image_search's query ids
    photos: list[bytes]
    relevant: list  # catalogue rows that are a hit, per photo
    bought: np.ndarray  # bool per photo: its session bought the item (the purchase subset)
    leaves: np.ndarray  # leaf of each catalogue row
    texts: HeldOut
    text_relevant: list
    pairs: HeldOut  # item queries
    item_relevant: list
    own_rows: np.ndarray  # each item query's own catalogue row
    labelled_photos: HeldOut = HeldOut([], [])  # the labelled set's test queries with a photo
    labelled_photo_relevant: list = ()
    labelled_texts: HeldOut = HeldOut([], [])  # ... and with a text
    labelled_text_relevant: list = ()

    @classmethod
    def load(cls, config: MoonConfig, run_dir: Path, split: str = "test") -> QuerySets:
        spu_hit = config.eval.spu_hit
        items = read_table(run_dir, "items")
        queries = eval_photos(run_dir, split)
        catalogue = (items["item_id"], items["spu_id"])
        texts = held_out(run_dir, ("text",), "query_text", split)
        pairs = held_out(run_dir, ITEM_QUERY_VIEWS, "query_item_id", split)
        own = relevant_items(pairs.queries, None, catalogue[0], None, False)
        labelled = {column: labelled_held_out(run_dir, column, set(catalogue[0].to_pylist()), split)
                    for column in ("query_image", "query_text")}
        return cls(
            items=items, views=ItemViews(items), photo_query_ids=queries["query_id"],
            photos=queries["query_image"].to_pylist(),
            bought=pc.equal(queries["action"], "purchase").to_numpy(zero_copy_only=False),
            relevant=relevant_items(queries["item_id"], queries["spu_id"], *catalogue, spu_hit=spu_hit),
            leaves=np.array([path[-1] for path in items["category"].to_pylist()], dtype=object),
            texts=texts, text_relevant=relevant_sets(texts.targets, *catalogue, spu_hit=spu_hit),
            pairs=pairs, item_relevant=relevant_sets(pairs.targets, *catalogue, spu_hit=spu_hit),
            own_rows=np.array([rows[0] for rows in own], np.int64),
            labelled_photos=labelled["query_image"],
            labelled_photo_relevant=relevant_sets(labelled["query_image"].targets, *catalogue, spu_hit=spu_hit),
            labelled_texts=labelled["query_text"],
            labelled_text_relevant=relevant_sets(labelled["query_text"].targets, *catalogue, spu_hit=spu_hit),
        )

    def score(self, vectors: Vectors, config: MoonConfig) -> tuple[dict, tuple[np.ndarray, np.ndarray], dict]:
        """(report, image-search top results, per-query hits at the full dimension of each query set)
        of one model's vectors on every query set."""
        scored = {"ks": config.eval.ks, "seed": config.seed}
        image_search = retrieval_recall(vectors.photos, vectors.items, self.relevant, dims=vectors.dims, **scored)
        report = image_search.to_dict()
        hits = {IMAGE_SEARCH: _full_hits(image_search)}
        report["hard_same_leaf"] = same_leaf_recall(vectors.photos, vectors.items, self.relevant, self.leaves,
                                                    config.seed)
        if self.bought.any():
            report[PURCHASED] = image_search.subset(self.bought).to_dict()
        searches = [("text_search", self.texts, vectors.texts, self.text_relevant, None),
                    ("item_to_item", self.pairs, vectors.items[self.own_rows], self.item_relevant, self.own_rows),
                    ("labelled_image_search", self.labelled_photos, vectors.labelled_photos,
                     self.labelled_photo_relevant, None),
                    ("labelled_text_search", self.labelled_texts, vectors.labelled_texts,
                     self.labelled_text_relevant, None)]
        for key, held, queries, relevant, exclude in searches:
            if len(held) and queries is not None:
                result = retrieval_recall(queries, vectors.items, relevant, dims=vectors.dims, exclude=exclude,
                                          **scored)
                report[key], hits[key] = result.to_dict(), _full_hits(result)
        return report, image_search.top, hits


def evaluate(config: MoonConfig, run_dir: Path, extra_models: dict[str, Path] | None = None,
             split: str = "test") -> dict:
    """Measures every model of the run (and `extra_models`, label -> directory) on one split's queries;
    writes eval/retrieval.json (test) or eval/retrieval-<split>.json."""
    sets = QuerySets.load(config, run_dir, split)
    run = RunDir(run_dir)
    results, hits = {}, {}
    for label, vectors in _models(config, run_dir, sets, extra_models):
        ui.log(f"evaluating {label}")
        results[label], top, hits[label] = sets.score(vectors, config)
        if split == "test":
            save_predictions(run.predictions(label), sets.photo_query_ids, top, vectors, sets.views.item_ids)
    for label in results:
        if label != REFERENCE:
            results[label]["vs_baseline"] = paired_differences(hits[label], hits[REFERENCE], config.seed)
    if {"stage1", "stage2"} <= set(hits):  # what stage 2 adds to the model it starts from
        results["stage2"]["vs_stage1"] = paired_differences(hits["stage2"], hits["stage1"], config.seed)
    run.eval.mkdir(parents=True, exist_ok=True)
    atomic_json(run.retrieval_results_of(split), {"split": split, "item_view": config.model.served_view,
                                                  "spu_hit": config.eval.spu_hit, "models": results})
    return results


def evaluate_versions(config: MoonConfig, run_dir: Path, versions: Sequence[str]) -> dict[str, dict]:
    """The same recall of store versions, from the vectors they hold: the catalogue's items and the
    log's queries (every held-out photo and text query is a query of the log). Any version will do,
    one made without a model too; a version lacking a held-out query or item is refused."""
    sets = QuerySets.load(config, run_dir)
    if len(sets.labelled_photos) + len(sets.labelled_texts):
        ui.log("store versions hold the log's queries, not a labelled set's: its query sets are left out here")
    store = Store(run_dir)
    photo_ids = [query_id(None, photo) for photo in sets.photos]
    text_ids = [query_id(text, None) for text in sets.texts.queries]
    results = {}
    for name in versions:
        version = store.open(name)
        rows = {"items": version.rows(sets.views.item_ids), "queries": version.rows(photo_ids + text_ids, of="queries")}
        for kind, found in rows.items():
            if (found < 0).any():
                raise UserError(f"store version {name} lacks {int((found < 0).sum())} of the held-out {kind}: "
                                f"add them with `moon embed --incremental --version {name}`")
        queries = version.vectors(of="queries")[rows["queries"]]
        vectors = Vectors(queries[: len(photo_ids)], queries[len(photo_ids):], version.vectors()[rows["items"]], None,
                          version.manifest.get("item_view") or SERVED_VIEW, f"store version {name}")
        ui.log(f"evaluating store version {name}")
        results[name] = sets.score(vectors, config)[0]
    return results


def _full_hits(report) -> dict[int, np.ndarray]:
    """k -> per-query hits at the report's full dimension."""
    return report.hits[max(report.hits)]


def paired_differences(model: dict, reference: dict, seed: int) -> dict:
    """Per query set and K: the model's recall minus the reference's on the same queries, with a
    95% bootstrap interval over the queries (a paired comparison: both ranked the same queries)."""
    out = {}
    for key, by_k in model.items():
        if key not in reference:
            continue
        out[key] = {}
        for k, hits in by_k.items():
            difference = hits.astype(np.float64) - reference[key][k]
            out[key][f"recall@{k}"] = {"delta": float(difference.mean()), "ci95": list(bootstrap_ci(difference, seed)),
                                       "queries": len(difference)}
    return out


def save_predictions(path: Path, query_ids: pa.ChunkedArray, top: tuple[np.ndarray, np.ndarray], vectors: Vectors,
                     item_ids: list[str]) -> None:
    """One model's image-search rankings at the full dimension, the `top` its recall was computed from:
    query id, top PREDICTED_K item ids, their scores; the file's metadata says which view the
    catalogue was seen in and where its vectors came from."""
    scores, ranked = (part[:, :PREDICTED_K] for part in top)
    ids = np.asarray(item_ids, dtype=object)[ranked]
    table = pa.table({"query_id": query_ids, "item_ids": pa.array(ids.tolist(), pa.list_(pa.string())),
                      "scores": pa.array(scores.tolist(), pa.list_(pa.float32()))})
    table = table.replace_schema_metadata({"item_view": vectors.item_view, "item_vectors": vectors.source})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_parquet(table, path)


def labelled_held_out(run_dir: Path, column: str, catalogue_ids: set[str], split: str = "test") -> HeldOut:
    """One split of the run's labelled query set, its queries with a `column` (query_image or
    query_text), each with its judged items. Items the catalogue no longer holds (it was replaced
    after the set was ingested) are left out, and queries left with none; a log line says so."""
    if not has_table(run_dir, LABELLED_TABLE):
        return HeldOut([], [])
    table = read_table(run_dir, LABELLED_TABLE, columns=[column, "item_ids", "split"])
    test = table.filter(pc.and_(pc.equal(table["split"], split), pc.is_valid(table[column])))
    queries, targets, gone = [], [], 0
    for query, items in zip(test[column].to_pylist(), test["item_ids"].to_pylist()):
        known = sorted(item for item in items if item in catalogue_ids)
        gone += len(items) - len(known)
        if known:
            queries.append(query)
            targets.append(known)
    if gone:
        ui.log(f"labelled {column}: {gone} judged items are not in the catalogue (replaced since the set was "
               f"ingested?): left out, and {test.num_rows - len(queries)} queries with none left")
    return HeldOut(queries, targets)


def held_out(run_dir: Path, query_views: Sequence[str], key: str, split: str = "test") -> HeldOut:
    """One split's pairs whose query view is one of `query_views`, grouped into one query per
    (session, query `key`) whose targets are every positive item of its pairs, from both pair tables."""
    groups: dict[tuple[str, str], set[str]] = {}
    for name in PAIR_TABLES:
        if not has_table(run_dir, name):
            continue
        table = read_table(run_dir, name, columns=["split", "query_view", "session_id", key, "pos_item_id"])
        wanted = pc.and_(pc.equal(table["split"], split), pc.is_in(table["query_view"], pa.array(query_views)))
        table = table.filter(wanted)
        for session, query, item in zip(*(table[c].to_pylist() for c in ("session_id", key, "pos_item_id"))):
            groups.setdefault((session, query), set()).add(item)
    order = sorted(groups)
    return HeldOut([query for _, query in order], [sorted(groups[k]) for k in order])


def _models(config, run_dir, sets: QuerySets, extra_models):
    """(label, Vectors) for each model, computed one at a time."""
    items, views, photos, texts = sets.items, sets.views, sets.photos, sets.texts.queries
    baseline = BaselineEmbedder.fit(items)
    yield "baseline", Vectors(baseline.encode_images(photos), baseline.encode_texts(texts),
                              baseline.encode_items(items, SERVED_VIEW), None, SERVED_VIEW,
                              **_labelled_vectors(sets, baseline.encode_images, baseline.encode_texts))
    untrained = Embedder.create(config.model, views.texts(), seed=config.seed)
    yield "untrained", _embed(untrained, sets)
    run = RunDir(run_dir)
    found = {stage: run.model(stage) for stage in run.trained_models()}
    for label, path in {**found, **(extra_models or {})}.items():
        embedder = Embedder.load(path)
        yield label, _embed(embedder, sets, *_served_items(run_dir, embedder, views))


def _labelled_vectors(sets: QuerySets, encode_photos, encode_texts) -> dict:
    """The labelled set's test photos and texts encoded, as Vectors fields; none without a labelled set."""
    vectors = {}
    if len(sets.labelled_photos):
        vectors["labelled_photos"] = encode_photos(sets.labelled_photos.queries)
    if len(sets.labelled_texts):
        vectors["labelled_texts"] = encode_texts(sets.labelled_texts.queries)
    return vectors


def _served_items(run_dir: Path, embedder: Embedder, views: ItemViews) -> tuple[np.ndarray | None, str | None]:
    """The catalogue as served, and the store version it came from: the vectors of a version these
    weights made in the view they serve, if one holds every item (the catalogue need not be
    embedded again); else (None, None)."""
    store = Store(run_dir)
    model_path = Path(embedder.settings.checkpoint)
    version = store.made_by(model_path)
    if version is None:
        return None, None
    stored = store.open(version)
    rows = stored.rows(views.item_ids)
    if stored.manifest.get("item_view") != embedder.settings.served_view or (rows < 0).any():
        return None, None
    ui.log(f"catalogue vectors of {model_path.name} from store version {version}")
    return stored.vectors()[rows], version


def _embed(embedder: Embedder, sets: QuerySets, items: np.ndarray | None = None, version: str | None = None) -> Vectors:
    view, views, photos, texts = embedder.settings.served_view, sets.views, sets.photos, sets.texts.queries
    labelled = len(sets.labelled_photos) + len(sets.labelled_texts)
    total = len(photos) + len(texts) + labelled + (len(views) if items is None else 0)
    with ui.progress("encode queries and catalogue", total, unit="inputs") as advance:
        encode_photos, encode_texts = _query_encoders(embedder, advance)
        return Vectors(
            photos=encode_photos(photos),
            texts=encode_texts(texts),
            items=embedder.encode(views.inputs(range(len(views)), view), advance=advance) if items is None else items,
            dims=sorted({*embedder.settings.matryoshka_dims, embedder.dim}),
            item_view=view,
            source=f"store version {version}" if version else Vectors.source,
            **_labelled_vectors(sets, encode_photos, encode_texts),
        )


def _query_encoders(embedder: Embedder, advance: ui.Advance):
    """(photos -> vectors, texts -> vectors): the model's image and text paths, reporting to one progress bar."""
    def encode_photos(photos: list[bytes]) -> np.ndarray:
        return embedder.encode([Input(None, photo) for photo in photos], advance=advance)

    def encode_texts(texts: list[str]) -> np.ndarray:
        return embedder.encode([Input(text, None) for text in texts], advance=advance)

    return encode_photos, encode_texts


def same_leaf_recall(query_vectors, item_vectors, relevant, leaves: np.ndarray, seed: int) -> dict:
    """recall@10 when the only distractors are items of the target's leaf category."""
    scores = prefix(query_vectors) @ prefix(item_vectors).T
    target_leaf = leaves[[next(iter(r)) for r in relevant]]
    scores[leaves[None, :] != target_leaf[:, None]] = -np.inf
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, :HARD_K]
    hits = recall_at_k(ranked, relevant, [HARD_K])[HARD_K]
    lo, hi = bootstrap_ci(hits, seed)
    return {f"recall@{HARD_K}": {"value": float(hits.mean()), "ci95": [lo, hi]}}


def print_saved(run_dir: Path) -> None:
    print_results(json.loads(RunDir(run_dir).retrieval_results.read_text())["models"])


def print_results(results: dict) -> None:
    """The image-search table (the guiding metric), then one table of text search and item -> item."""
    rows, columns = [], ()
    for label, report in results.items():
        dims = report["dims"]
        full = _full(dims)
        ks, k = _ks(full)  # the same in every report of one run
        per_dim = " / ".join(f"{dims[d][f'recall@{k}']['value']:.3f}" for d in sorted(dims, key=int))
        rows.append((label, *_summary(full), report["hard_same_leaf"][f"recall@{HARD_K}"]["value"], per_dim))
        columns = ("model", *_summary_columns(full), f"R@{HARD_K} same-leaf", f"R@{k} per dim")
    queries = next(iter(results.values()))["queries"]
    ui.print_table(f"image-based search recall ({queries:,} user photos -> the item photographed, whole catalogue)",
                   rows, columns)
    _print_other_groups(results)
    _print_paired(results)


def _print_paired(results: dict) -> None:
    """Each model's recall@10 minus the baseline's on the same queries, with its 95% interval; and stage 2's
    minus stage 1's."""
    keys = [(IMAGE_SEARCH, "photo"), *OTHER_GROUPS]
    rows = []
    for label, report in results.items():
        rows += _paired_row(label, report.get("vs_baseline", {}), keys)
    if rows:
        ui.print_table(f"R@{HARD_K} minus the baseline's on the same queries (paired, 95% CI), full dimension", rows,
                       ("model", *(name for _, name in keys)))
    if "vs_stage1" in results.get("stage2", {}):
        ui.print_table(f"R@{HARD_K} of stage 2 minus stage 1's on the same queries (paired, 95% CI), full dimension",
                       _paired_row("stage2", results["stage2"]["vs_stage1"], keys), ("model", *(n for _, n in keys)))


def _paired_row(label: str, paired: dict, keys) -> list[tuple]:
    """[one table row of paired differences], or [] when there are none."""
    cells = []
    for key, _ in keys:
        entry = paired.get(key, {}).get(f"recall@{HARD_K}")
        cells.append("-" if entry is None else
                     f"{entry['delta']:+.3f} [{entry['ci95'][0]:+.3f}, {entry['ci95'][1]:+.3f}]")
    return [(label, *cells)] if paired else []


OTHER_GROUPS = (("text_search", "text"), ("item_to_item", "item->item"),
                ("labelled_image_search", "labelled photo"), ("labelled_text_search", "labelled text"))


def _print_other_groups(results: dict) -> None:
    """Text search, item -> item and the labelled sets at the full dimension, one row per query set and model."""
    rows, columns, counts = [], (), []
    for key, name in OTHER_GROUPS:
        reports = {label: report[key] for label, report in results.items() if key in report}
        for label, report in reports.items():
            full = _full(report["dims"])
            rows.append((name, label, *_summary(full)))
            columns = ("queries", "model", *_summary_columns(full))
        if reports:
            counts.append(f"{next(iter(reports.values()))['queries']:,} {name}")
    if rows:
        labelled = ", labelled queries" if any("labelled" in count for count in counts) else ""
        ui.print_table(f"text search and item -> item{labelled} recall, full dimension ({', '.join(counts)} queries)",
                       rows, columns)


def _summary(full: dict) -> tuple:
    """R@(smallest K), R@headline K with its interval, R@(largest K)."""
    ks, k = _ks(full)
    return full[f"recall@{ks[0]}"]["value"], full[f"recall@{k}"]["value"], _ci(full[f"recall@{k}"]), \
        full[f"recall@{ks[-1]}"]["value"]


def _summary_columns(full: dict) -> tuple[str, ...]:
    ks, k = _ks(full)
    return f"R@{ks[0]}", f"R@{k}", f"R@{k} 95% CI", f"R@{ks[-1]}"


def _full(dims: dict) -> dict:
    """The figures at the full dimension (the widest)."""
    return dims[max(dims, key=int)]


def _ks(by_k: dict) -> tuple[list[int], int]:
    """The K values of a report and its headline K (10 where measured, else the smallest)."""
    ks = sorted(int(name.split("@")[1]) for name in by_k)
    return ks, 10 if 10 in ks else ks[0]


def _ci(metric: dict) -> str:
    lo, hi = metric["ci95"]
    return f"{lo:.3f}-{hi:.3f}"
