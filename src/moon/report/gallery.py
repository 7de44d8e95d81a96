"""The image-search gallery: held-out user photos beside what the newest model retrieves for them.

Numbers say how often the model finds the bought product; the gallery shows what it finds
instead, so a reader can judge whether misses are near misses (same kind of product) or
nonsense. Queries are drawn with the run's seed, half from hits and half from misses when
both exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from moon import ui
from moon.config import MoonConfig
from moon.data.tables import has_table, read_table
from moon.errors import UserError
from moon.eval.image_search import ITEM_VIEW
from moon.eval.retrieval import top_k
from moon.model.embedder import Embedder
from moon.model.inputs import Input
from moon.model.views import ItemViews
from moon.report.html import Section, not_run, note, text, thumbnail
from moon.represent.batch import load_embedder, resolve_model
from moon.store.search import version_made_by
from moon.store.versions import Store

QUERIES = 8
RESULTS = 5
CANDIDATES = 256  # held-out queries searched to find hits and misses among; bounds the encoding cost


@dataclass
class Catalogue:
    """The searched catalogue: ids and vectors in one order, and where the vectors came from."""

    item_ids: list[str]
    vectors: np.ndarray
    source: str


def section(config: MoonConfig, run_dir: Path) -> Section:
    title = "Image-search gallery"
    if not has_table(run_dir, "eval_image_search"):
        return Section("image-search-gallery", title, not_run("no held-out photo queries", "moon pairs"))
    try:
        label, path = resolve_model(run_dir, None)
    except UserError:
        return Section("image-search-gallery", title, not_run("no trained model", "moon posttrain --stage 1"))
    queries = read_table(run_dir, "eval_image_search", ["query_id", "query_image", "item_id"])
    if queries.num_rows == 0:
        return Section("image-search-gallery", title, note("the evaluation set holds no photo queries"))
    items = read_table(run_dir, "items", ["item_id", "title", "category", "attributes", "image"])
    embedder = load_embedder(path, config.model.bidirectional, torch.device("cpu"))
    catalogue = catalogue_vectors(run_dir, path, items, embedder)
    ui.log(f"gallery: {label} model; catalogue vectors {catalogue.source}")

    rng = np.random.default_rng(config.seed)
    searched = search(embedder, catalogue, queries, rng)
    shown = choose(searched.hits, rng)
    images = dict(zip(items["item_id"].to_pylist(), items["image"].to_pylist()))
    titles = dict(zip(items["item_id"].to_pylist(), items["title"].to_pylist()))
    rows = [render_query(searched.query_ids[q], searched.photos[q], searched.bought[q], searched.found[q],
                         searched.scores[q], images, titles) for q in shown]
    header = (f"<p>Model <b>{text(label)}</b> ({text(path)}); catalogue vectors: {text(catalogue.source)} "
              f"({len(catalogue.item_ids):,} items, {ITEM_VIEW} view). {len(shown)} of the "
              f"{queries.num_rows:,} held-out photo queries (drawn with seed {config.seed} from hits and misses), "
              f"each beside its top {RESULTS}; a green border marks the bought item.</p>")
    metrics = {"model": label, "item_vectors": catalogue.source, "queries": len(shown),
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


def search(embedder: Embedder, catalogue: Catalogue, queries: pa.Table, rng: np.random.Generator) -> Searched:
    """Up to CANDIDATES held-out queries (a seeded draw, in table order) searched exactly over the catalogue."""
    rows = pa.array(np.sort(rng.permutation(queries.num_rows)[:CANDIDATES]))
    photos = queries["query_image"].take(rows).to_pylist()
    bought = queries["item_id"].take(rows).to_pylist()
    scores, ranked = top_k(embedder.encode([Input(None, photo) for photo in photos]), catalogue.vectors, RESULTS)
    found = [[catalogue.item_ids[i] for i in row] for row in ranked]
    hits = np.array([item in row for item, row in zip(bought, found)], dtype=bool)
    return Searched(queries["query_id"].take(rows).to_pylist(), photos, bought, found, scores, hits)


def catalogue_vectors(run_dir: Path, model_path: Path, items: pa.Table, embedder: Embedder) -> Catalogue:
    """The latest store version when the same weights made it in the served view, else the catalogue
    encoded now: vectors from other weights live in another space and cannot be searched with these."""
    name = version_made_by(run_dir, model_path)
    version = Store(run_dir).open(name) if name else None
    if version is not None and version.manifest.get("item_view") == ITEM_VIEW:
        return Catalogue(version.item_ids(), version.vectors(), f"store version {version.name}")
    views = ItemViews(items)
    vectors = embedder.encode(views.inputs(range(len(views)), ITEM_VIEW))
    return Catalogue(views.item_ids, vectors, "encoded for this report")


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
