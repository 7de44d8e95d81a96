"""`moon eval retrieval`: image-based search recall of every model of a run (docs/metrics.md).

The held-out user photos of `eval_image_search` search the whole catalogue. Every model
the run has is measured on the same queries: the non-learned baseline, the untrained
backbone, the pretrained model, and the stage-1 and stage-2 embedders, at every
Matryoshka dimension; plus a hard set where each query's distractors are only the
items of its target's leaf category. Results go to `eval/retrieval.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from moon import ui
from moon.config import MoonConfig
from moon.data.baseline import BaselineEmbedder
from moon.data.tables import has_table, read_table
from moon.eval.retrieval import bootstrap_ci, matryoshka_prefix, recall_at_k, relevant_items, retrieval_recall
from moon.model.embedder import Embedder
from moon.model.inputs import Input
from moon.model.views import ItemViews
from moon.train.loop import model_dir

ITEM_VIEW = "richer-text+image"  # the item representation MOON serves
MODELS = ("pretrain", "stage1", "stage2")
HARD_K = 10


def evaluate(config: MoonConfig, run_dir: Path, extra_models: dict[str, Path] | None = None) -> dict:
    """Measures every model of the run (and `extra_models`, label -> directory); writes eval/retrieval.json."""
    items = read_table(run_dir, "items")
    queries = read_table(run_dir, "eval_image_search")
    views = ItemViews(items)
    relevant = relevant_items(queries["item_id"], queries["spu_id"], items["item_id"], items["spu_id"], spu_hit=False)
    leaves = np.array([path[-1] for path in items["category"].to_pylist()], dtype=object)
    photos = queries["query_image"].to_pylist()

    results = {}
    for label, (query_vectors, item_vectors, dims) in _models(config, run_dir, items, views, photos, extra_models):
        ui.log(f"evaluating {label}")
        report = retrieval_recall(query_vectors, item_vectors, relevant, dims=dims, seed=config.seed).to_dict()
        report["hard_same_leaf"] = same_leaf_recall(query_vectors, item_vectors, relevant, leaves, config.seed)
        results[label] = report
    out = Path(run_dir) / "eval" / "retrieval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"item_view": ITEM_VIEW, "models": results}, indent=2) + "\n")
    return results


def _models(config, run_dir, items: pa.Table, views: ItemViews, photos: list[bytes], extra_models):
    """(label, (query vectors, item vectors, dims)) for each model, computed one at a time."""
    baseline = BaselineEmbedder.fit(items)
    yield "baseline", (baseline.encode_images(photos), baseline.encode_items(items, ITEM_VIEW), None)
    untrained = Embedder.create(config.model, views.texts(), seed=config.seed)
    yield "untrained", _embed(untrained, views, photos)
    found = {stage: model_dir(run_dir, stage) for stage in MODELS if has_table(run_dir, f"models/{stage}")}
    for label, path in {**found, **(extra_models or {})}.items():
        embedder = Embedder.load(path)
        embedder.backbone.language_model.config.is_causal = not config.model.bidirectional
        yield label, _embed(embedder, views, photos)


def _embed(embedder: Embedder, views: ItemViews, photos: list[bytes]):
    query_vectors = embedder.encode([Input(None, photo) for photo in photos])
    item_vectors = embedder.encode(views.inputs(range(len(views)), ITEM_VIEW))
    dims = sorted({*embedder.settings.matryoshka_dims, embedder.dim})
    return query_vectors, item_vectors, dims


def same_leaf_recall(query_vectors, item_vectors, relevant, leaves: np.ndarray, seed: int) -> dict:
    """recall@10 when the only distractors are items of the target's leaf category."""
    scores = matryoshka_prefix(query_vectors) @ matryoshka_prefix(item_vectors).T
    target_leaf = leaves[[next(iter(r)) for r in relevant]]
    scores[leaves[None, :] != target_leaf[:, None]] = -np.inf
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, :HARD_K]
    hits = recall_at_k(ranked, relevant, [HARD_K])[HARD_K]
    lo, hi = bootstrap_ci(hits, seed)
    return {f"recall@{HARD_K}": {"value": float(hits.mean()), "ci95": [lo, hi]}}


def print_saved(run_dir: Path) -> None:
    print_results(json.loads((Path(run_dir) / "eval" / "retrieval.json").read_text())["models"])


def print_results(results: dict) -> None:
    rows = []
    for label, report in results.items():
        dims = report["dims"]
        full = dims[max(dims, key=int)]
        per_dim = " / ".join(f"{dims[d]['recall@10']['value']:.3f}" for d in sorted(dims, key=int))
        ci = full["recall@10"]["ci95"]
        rows.append((label, full["recall@1"]["value"], full["recall@10"]["value"], f"{ci[0]:.3f}-{ci[1]:.3f}",
                     full["recall@100"]["value"], report["hard_same_leaf"]["recall@10"]["value"], per_dim))
    ui.print_table("image-based search recall (user photo -> purchased item, whole catalogue)", rows,
                   ("model", "R@1", "R@10", "R@10 95% CI", "R@100", "R@10 same-leaf", "R@10 per dim"))
