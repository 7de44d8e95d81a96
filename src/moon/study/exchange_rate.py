"""`moon study exchange-rate`: which intermediate metric predicts what a representation buys in CTR.

For every representation of `study.versions` and every shorter stage-1 run of
`study.token_fractions`, all trained only on days before the CTR test days (post-training
reads the pairs' train split, which ends where the CTR valid and test days begin; the
baseline, random and oracle versions learn nothing from behaviour):

1. its store version (`moon.study.variants`);
2. its intermediate metrics, from the vectors the version holds (`evaluate_versions`): image-
   search recall@1/10/100, the same-leaf hard set's recall@10, text-search and item->item
   recall@10, each at the version's full dimension;
3. CUBE over it against DIN with one CTR setup (the config's `ctr` section) and every seed of
   `ctr.seeds` (`moon.study.downstream`).

Per metric: the exchange rate (ΔAUC per +0.01, Theil-Sen, with a bootstrap interval over
versions and seeds), Spearman's ρ and the leave-one-version-out error (`moon.study.fit`). The
best guide is the metric with the smallest leave-one-out error; the verdict says whether
image-based search recall is that metric. Results go to `study/exchange_rate.json`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moon import ui
from moon.config import MoonConfig
from moon.eval.retrieval import evaluate_versions
from moon.io.atomic import atomic_json
from moon.study.downstream import cube_lifts
from moon.study.fit import ER_STEP, exchange_rate
from moon.study.variants import study_dir, trained_token_variants, version_of

RESULTS = "exchange_rate.json"
GUIDING = "image R@10"  # the paper's guiding metric, at the K the report leads with
METRICS = {  # name -> (group of the retrieval report, K)
    "image R@1": (None, 1), GUIDING: (None, 10), "image R@100": (None, 100),
    "same-leaf image R@10": ("hard_same_leaf", 10), "text R@10": ("text_search", 10),
    "item->item R@10": ("item_to_item", 10),
}
IMAGE_SEARCH = ("image R@1", GUIDING, "image R@100")  # image-based search recall, whole catalogue


def results_path(run_dir: Path) -> Path:
    return study_dir(run_dir) / RESULTS


def study_exchange_rate(config: MoonConfig, run_dir: Path) -> dict:
    versions = representation_versions(config, run_dir)
    retrieval = evaluate_versions(config, run_dir, list(versions.values()))
    metrics = {label: intermediate_metrics(retrieval[version]) for label, version in versions.items()}
    lifts = cube_lifts(config, run_dir, list(versions.values()))
    rows = [{"label": label, "version": version, "metrics": metrics[label], "delta_auc": lifts[version]["delta_auc"],
             "delta_logloss": lifts[version]["delta_logloss"]} for label, version in versions.items()]
    rates = {}
    for metric in METRICS:
        values = np.array([row["metrics"][metric] for row in rows])
        rates[metric] = exchange_rate(values, [np.array(row["delta_auc"]) for row in rows], config.seed).to_dict()
    results = {"versions": rows, "rates": rates, "per": ER_STEP, "seeds": config.ctr.seeds, "guiding": GUIDING,
               "din_auc": {str(s): v["auc"] for s, v in lifts["din"].items()}, "verdict": verdict(rates)}
    atomic_json(results_path(run_dir), results)
    return results


def representation_versions(config: MoonConfig, run_dir: Path) -> dict[str, str]:
    """{label: store version} of every representation compared, made where missing."""
    out = {}
    for name in [*config.study.versions, *trained_token_variants(config, run_dir)]:
        out[name] = version_of(config, run_dir, name)
        ui.log(f"study: {name} is store version {out[name]}")
    return out


def intermediate_metrics(report: dict) -> dict[str, float]:
    """The full-dimension values of METRICS in one version's retrieval report."""
    out = {}
    for name, (group, k) in METRICS.items():
        section = report if group is None else report[group]
        if "dims" in section:
            section = section["dims"][max(section["dims"], key=int)]
        out[name] = section[f"recall@{k}"]["value"]
    return out


def verdict(rates: dict[str, dict]) -> dict:
    """The best guide (smallest leave-one-out error), its margin over the next, and where
    image-based search recall (any K of the whole-catalogue image search) ranks; in words as well."""
    order = sorted(rates, key=lambda m: rates[m]["loo_error"])
    best, second = order[0], order[1] if len(order) > 1 else None
    margin = rates[second]["loo_error"] - rates[best]["loo_error"] if second else None
    words = (f"On this data the best guide to CTR gains is {best}: its line predicts a left-out version's ΔAUC "
             f"within {rates[best]['loo_error']:.4f} on average (ΔAUC spread over versions "
             f"{rates[best]['spread']:.4f}), {margin:.4f} better than {second}; Spearman ρ "
             f"{rates[best]['spearman']:.2f}. ") if second else ""
    image = [metric for metric in order if metric in IMAGE_SEARCH]
    if best in IMAGE_SEARCH:
        words += f"Image-based search recall is the best guide, as the paper found ({best} first"
        words += f", {GUIDING} ranks {order.index(GUIDING) + 1} of {len(order)})." if best != GUIDING else ")."
    else:
        words += (f"Image-based search recall is not the best guide here, unlike the paper's finding: its best K "
                  f"({image[0]}) ranks {order.index(image[0]) + 1} of {len(order)}.")
    return {"best": best, "margin": margin, "ranking": order, "guiding_rank": order.index(GUIDING) + 1,
            "image_search_best": best in IMAGE_SEARCH, "text": words}
