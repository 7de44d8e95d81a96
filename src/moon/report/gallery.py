"""The image-search gallery: held-out user photos beside what the newest model retrieved for them.

Numbers say how often the model finds the bought product; the gallery shows what it finds
instead, so a reader can judge whether misses are near misses (same kind of product) or
nonsense. It only renders what `moon eval retrieval` found (`eval/predictions/<model>.parquet`):
it loads no model and searches nothing. Queries are drawn with the run's seed, half from
hits and half from misses when both exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moon.config import MoonConfig
from moon.io.tables import has_table, read_table
from moon.pairs.eval_set import eval_photos
from moon.report.html import Section, not_run, note, text, thumbnail
from moon.run import RunDir

QUERIES = 8
RESULTS = 5
CANDIDATES = 256  # held-out queries (a seeded draw) that hits and misses are chosen among


def section(config: MoonConfig, run_dir: Path) -> Section:
    title = "Image-search gallery"
    run = RunDir(run_dir)
    if not has_table(run_dir, "eval_image_search"):
        return Section("image-search-gallery", title, not_run("no held-out photo queries", "moon pairs"))
    label = run.latest_model()
    if label is None:
        return Section("image-search-gallery", title, not_run("no trained model", "moon posttrain --stage 1"))
    if not run.predictions(label).is_file():
        return Section("image-search-gallery", title, not_run(f"no image-search results of {label}", "moon eval retrieval"))
    queries = eval_photos(run_dir, "test", ["query_id", "query_image", "item_id"])
    if queries.num_rows == 0:
        return Section("image-search-gallery", title, note("the evaluation set holds no photo queries"))
    predictions = pq.read_table(run.predictions(label))
    saved = {key.decode(): value.decode() for key, value in (predictions.schema.metadata or {}).items()}

    rng = np.random.default_rng(config.seed)
    searched = search(queries, predictions, rng)
    shown = choose(searched.hits, rng)
    items = read_table(run_dir, "items", ["item_id", "title", "image"])
    images = dict(zip(items["item_id"].to_pylist(), items["image"].to_pylist()))
    titles = dict(zip(items["item_id"].to_pylist(), items["title"].to_pylist()))
    rows = [render_query(searched.query_ids[q], searched.photos[q], searched.bought[q], searched.found[q],
                         searched.scores[q], images, titles) for q in shown]
    header = (f"<p>Model <b>{text(label)}</b> ({text(run.model(label))}); catalogue vectors: {text(saved['item_vectors'])} "
              f"({items.num_rows:,} items, {text(saved['item_view'])} view). {len(shown)} of the "
              f"{queries.num_rows:,} held-out photo queries (drawn with seed {config.seed} from hits and misses), "
              f"each beside its top {RESULTS}; a green border marks the bought item.</p>")
    metrics = {"model": label, "item_vectors": saved["item_vectors"], "queries": len(shown),
               "hits": int(searched.hits[shown].sum()), "searched": len(searched.bought),
               f"recall@{RESULTS}_of_searched": float(searched.hits.mean())}
    return Section("image-search-gallery", title, header + "\n".join(rows), {"gallery": metrics})


@dataclass
class Searched:
    """Held-out queries and their top results, row by row."""

    query_ids: list[str]
    photos: list[bytes]
    bought: list[str]
    found: list[list[str]]  # item ids, best first
    scores: np.ndarray  # (queries, RESULTS) cosine similarities
    hits: np.ndarray  # bool: the bought item is among the results


def search(queries: pa.Table, predictions: pa.Table, rng: np.random.Generator) -> Searched:
    """Up to CANDIDATES held-out queries (a seeded draw, in table order) with the results eval saved."""
    rows = pa.array(np.sort(rng.permutation(queries.num_rows)[:CANDIDATES]))
    query_ids = queries["query_id"].take(rows).to_pylist()
    saved = dict(zip(predictions["query_id"].to_pylist(),
                     zip(predictions["item_ids"].to_pylist(), predictions["scores"].to_pylist())))
    found = [saved[q][0][:RESULTS] for q in query_ids]
    scores = np.array([saved[q][1][:RESULTS] for q in query_ids], dtype=np.float32)
    bought = queries["item_id"].take(rows).to_pylist()
    hits = np.array([item in row for item, row in zip(bought, found)], dtype=bool)
    return Searched(query_ids, queries["query_image"].take(rows).to_pylist(), bought, found, scores, hits)


def choose(hits: np.ndarray, rng: np.random.Generator, n: int = QUERIES) -> list[int]:
    """Up to n query positions, half hits and half misses where there are enough of each, in order."""
    hit, miss = rng.permutation(np.flatnonzero(hits)), rng.permutation(np.flatnonzero(~hits))
    take_hits = min(len(hit), max(n // 2, n - len(miss)))
    picked = [*hit[:take_hits], *miss[: n - take_hits]]
    return sorted(int(i) for i in picked)


def render_query(query_id: str, photo: bytes, bought: str, found: list[str], scores: np.ndarray,
                 images: dict[str, bytes], titles: dict[str, str]) -> str:
    """One row: the photo, the top results (hits bordered green and labelled) and the bought item."""
    figures = [f'<figure class="photo">{thumbnail(photo, "query photo")}<figcaption>query photo</figcaption></figure>']
    for rank, (item_id, score) in enumerate(zip(found, scores), start=1):
        hit = item_id == bought
        caption = f"#{rank} · hit · {score:.3f}" if hit else f"#{rank} · {score:.3f}"
        figures.append(item_figure(item_id, "result hit" if hit else "result", caption, images, titles))
    figures.append(item_figure(bought, "bought", "bought", images, titles))
    return (f'<div class="query" data-query-id="{text(query_id)}" data-bought="{text(bought)}">'
            + "".join(figures) + "</div>")


def item_figure(item_id: str, classes: str, caption: str, images: dict[str, bytes], titles: dict[str, str]) -> str:
    """A catalogue item's thumbnail with its title on hover (an item the catalogue no longer holds: its id)."""
    image = images.get(item_id)
    shown = thumbnail(image, item_id) if image else f"<code>{text(item_id)}</code>"
    return (f'<figure class="{classes}" data-item-id="{text(item_id)}" title="{text(titles.get(item_id, ""))}">'
            f"{shown}<figcaption>{text(caption)}</figcaption></figure>")
