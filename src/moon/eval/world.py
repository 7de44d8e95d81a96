"""`moon eval world`: how hard the simulated world is, measured without a trained model.

The world is calibrated against real shops (`docs/world.md`) with the non-learned baseline
and the simulator's truth only, before any model trains on it:

- **Photo difficulty.** Each held-out shopper photo of `eval_image_search` searches its
  item and `DISTRACTORS` random items of other SPUs, `DRAWS` times, by the baseline's
  colour/texture descriptor (the image part of `BaselineEmbedder`, which alone ranks items
  for a photo query). R@1 and R@10 among these 81 items do not depend on the catalogue's
  size, so they compare with a real photo set of any size: on 2,485 real shop photos of 81
  products the descriptor reaches R@1 0.074 and R@10 0.393 (`REAL_PHOTOS`).
- **Click ceilings.** Logistic models on what the click model knew of each impression
  (`impression_truth`), fitted on the train days and scored on the test days (the pairs
  stage's split): position only, then adding the item's true appeal, the true relevance to
  the query, and the true fit to the shopper; and the AUC of the true click probability,
  which no model can beat. A CTR model's AUC reads against these lines: between position
  only and the item-level line is what item IDs can learn; above it, query and shopper.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import OneHotEncoder

from moon import ui
from moon.baseline.descriptor import image_descriptors
from moon.config import MoonConfig
from moon.errors import UserError
from moon.eval.metrics import auc, bootstrap_ci
from moon.io.atomic import atomic_json
from moon.io.tables import has_table, read_manifest, read_table
from moon.pairs.eval_set import eval_photos
from moon.pairs.log import split_of_days
from moon.run import RunDir
from moon.sources.log import has_real_log

DISTRACTORS = 80  # other items beside the target: 81 in all, as in the real reference set
DRAWS = 200  # distractor draws per photo
REAL_PHOTOS = {"photos": 2485, "products": 81, "R@1": 0.074, "R@10": 0.393}  # the descriptor on real shop photos
AIM = {"R@1": (0.05, 0.15), "R@10": (0.35, 0.50)}  # the real range the world aims for
CEILINGS = (
    ("position only", ()),
    ("+ item appeal", ("appeal",)),
    ("+ true relevance", ("appeal", "relevance")),
    ("+ true fit", ("appeal", "relevance", "fit")),
)


def photo_difficulty(photos: list[bytes], targets: np.ndarray, item_images: list[bytes], item_spu: np.ndarray,
                     seed: int, draws: int = DRAWS) -> dict:
    """R@1 and R@10 of the baseline's descriptor when photo i searches item `targets[i]` among
    DISTRACTORS random items of other SPUs, `draws` times; 95% intervals by photo."""
    with ui.progress("describe photos and items", len(photos) + len(item_images), unit="images") as advance:
        queries = image_descriptors(photos, advance)
        items = image_descriptors(item_images, advance)
    scores = queries @ items.T
    own = scores[np.arange(len(targets)), targets]
    rng = np.random.default_rng(seed)
    ranks = np.zeros((len(targets), draws), dtype=np.int32)
    for i, target in enumerate(targets):
        others = np.flatnonzero(item_spu != item_spu[target])
        drawn = others[rng.integers(0, len(others), (draws, DISTRACTORS))]
        ranks[i] = (scores[i, drawn] > own[i]).sum(axis=1)
    result = {"photos": len(photos), "draws": draws, "items_per_search": DISTRACTORS + 1}
    for k in (1, 10):
        hits = (ranks < k).mean(axis=1)
        result[f"R@{k}"] = {"value": float(hits.mean()), "ci": bootstrap_ci(hits, seed),
                            "random": k / (DISTRACTORS + 1)}
    return result


def has_click_truth(run_dir: Path) -> bool:
    """The run's log was simulated by a MOON that records what its click model knew."""
    return has_table(run_dir, "impression_truth") and not has_real_log(run_dir)


def click_ceilings(run_dir: Path, config: MoonConfig) -> dict:
    """Test-day AUC of logistic models on the click model's truth, and of the true probability."""
    if not has_table(run_dir, "impression_truth"):
        raise UserError(f"{run_dir} has no impression_truth table: the ceilings need a log simulated by this "
                        "version of MOON (`moon simulate`); a real log has no truth to measure them with")
    truth = read_table(run_dir, "impression_truth")
    split = split_of_days(truth["day"].to_numpy(), read_manifest(run_dir, "events")["days"], config.pairs)
    test, train = split == "test", split == "train"
    clicked = truth["clicked"].to_numpy(zero_copy_only=False).astype(np.int8)
    positions = OneHotEncoder(handle_unknown="ignore").fit_transform(truth["position"].to_numpy()[:, None]).toarray()
    out = {"test_rows": int(test.sum()), "test_clicks": int(clicked[test].sum()), "models": {}}
    for name, terms in CEILINGS:
        features = np.hstack([positions, *(truth[t].to_numpy()[:, None] for t in terms)])
        model = LogisticRegression(max_iter=1000).fit(features[train], clicked[train])
        out["models"][name] = auc(clicked[test], model.predict_proba(features[test])[:, 1])
    out["models"]["true click probability"] = auc(clicked[test], truth["probability"].to_numpy()[test])
    return out


def ceilings(config: MoonConfig, run_dir: Path) -> dict | None:
    """The click ceilings of a simulated log: those `moon eval world` saved for the run's evaluation set
    as it is now, else fitted here; None for a log with no click truth (a real one)."""
    if not has_click_truth(run_dir):
        return None
    saved = json.loads(RunDir(run_dir).world_results.read_text()) if is_current(config, run_dir) else {}
    return saved.get("ceilings") or click_ceilings(run_dir, config)


def evaluate(config: MoonConfig, run_dir: Path) -> dict:
    """Photo difficulty and click ceilings of the run's world; writes eval/world.json."""
    run = RunDir(run_dir)
    if not has_table(run_dir, "eval_image_search"):
        raise UserError(f"{run_dir} has no evaluation set: run `moon pairs --run-dir {run_dir}` first")
    queries = eval_photos(run_dir, "test", ["query_image", "item_id"])
    items = read_table(run_dir, "items", ["item_id", "spu_id", "image"])
    row = {item: i for i, item in enumerate(items["item_id"].to_pylist())}
    targets = np.array([row[item] for item in queries["item_id"].to_pylist()])
    _, item_spu = np.unique(items["spu_id"].to_numpy(zero_copy_only=False), return_inverse=True)
    results = {"eval_set": read_manifest(run_dir, "eval_image_search")["created_at"],
               "photos": photo_difficulty(queries["query_image"].to_pylist(), targets,
                                          items["image"].to_pylist(), item_spu, config.seed),
               "real_photos": REAL_PHOTOS, "aim": AIM}
    if has_click_truth(run_dir):
        results["ceilings"] = click_ceilings(run_dir, config)
    run.eval.mkdir(parents=True, exist_ok=True)
    atomic_json(run.world_results, results)
    return results


def is_current(config: MoonConfig, run_dir: Path) -> bool:
    """Measured on the run's evaluation set as it is now (the measure reads no model)."""
    path = RunDir(run_dir).world_results
    return path.is_file() and has_table(run_dir, "eval_image_search") and \
        json.loads(path.read_text()).get("eval_set") == read_manifest(run_dir, "eval_image_search")["created_at"]


def print_results(results: dict) -> None:
    photos, real = results["photos"], results["real_photos"]
    rows = []
    for k in ("R@1", "R@10"):
        entry = photos[k]
        low, high = results["aim"][k]
        rows.append((k, f"{entry['value']:.3f}", f"[{entry['ci'][0]:.3f}, {entry['ci'][1]:.3f}]",
                     f"{real[k]:.3f}", f"{low:.2f}-{high:.2f}", f"{entry['random']:.3f}"))
    ui.print_table(f"Photo difficulty: the baseline's descriptor, each of {photos['photos']:,} shopper photos among "
                   f"its item and {photos['items_per_search'] - 1} others ({photos['draws']} draws)", rows,
                   ("", "this world", "95% CI", f"real shop photos ({real['photos']:,})", "aim", "random"))
    if "ceilings" in results:
        print_ceilings(results["ceilings"])


def print_ceilings(ceilings: dict) -> None:
    ui.print_table(f"Click ceilings on the test days ({ceilings['test_rows']:,} impressions, "
                   f"{ceilings['test_clicks']:,} clicks): logistic models on the simulator's truth",
                   [(name, f"{value:.4f}") for name, value in ceilings["models"].items()], ("known", "test AUC"))


def print_saved(run_dir: Path) -> None:
    path = RunDir(run_dir).world_results
    if path.is_file():
        print_results(json.loads(path.read_text()))

