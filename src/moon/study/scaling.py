"""`moon study scaling`: how quality grows with training tokens, negatives and behaviour length.

Three axes, each over the config's `study` values (at least four doublings by default):

- **tokens**: post-training pairs seen by stage 1 (the shorter runs of `study.token_fractions`
  and the run's own stage 1) -> image-search recall@10 of its version, and CUBE over it
  against DIN (test 1 - AUC, every seed of `ctr.seeds`);
- **negatives**: negatives per query in stage 2 (`study.queue_sizes`: the in-batch negatives
  plus a temporal queue) -> image-search recall@10;
- **behaviour length**: `ctr.max_len` in `study.behaviour_lengths` -> DIN's and CUBE's (over
  the stage-2 version) test logloss and AUC, every seed.

Each curve is fitted on its loss-like form (1 − recall, 1 − AUC, logloss) over every seed's
point, as the form of flat, log-linear and saturating power law that best predicts left-out
points (`moon.study.fit`); the largest x is then held out and predicted from the others. Where a
curve falls and has a non-learned reference (the baseline's recall, CUBE over the baseline's
vectors), the study says at what x it would reach it, if it holds. Results go
to `study/scaling.json`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moon.config import MoonConfig
from moon.eval.retrieval import evaluate_versions
from moon.io.atomic import atomic_json
from moon.study.downstream import cube_lifts
from moon.study.exchange_rate import GUIDING, intermediate_metrics
from moon.study.fit import curve_from_dict, fit_curve, held_out_check
from moon.study.variants import (
    negatives_per_query,
    queue_variants,
    study_dir,
    trained_token_variants,
    trained_variant,
    version_of,
)

RESULTS = "scaling.json"


def results_path(run_dir: Path) -> Path:
    return study_dir(run_dir) / RESULTS


def study_scaling(config: MoonConfig, run_dir: Path) -> dict:
    tokens, negatives = token_runs(config, run_dir), negative_runs(config, run_dir)
    baseline = version_of(config, run_dir, "baseline")
    versions = {name: version for name, (_, version) in {**tokens, **negatives}.items()} | {"baseline": baseline}
    recall = _recall(config, run_dir, versions)  # every version scored in one pass over the query sets
    results = {"tokens": tokens_axis(config, run_dir, tokens, recall, baseline),
               "negatives": negatives_axis(negatives, recall),
               "behaviour_length": length_axis(config, run_dir)}
    results["verdict"] = verdict(results)
    atomic_json(results_path(run_dir), results)
    return results


def token_runs(config: MoonConfig, run_dir: Path) -> dict[str, tuple[int, str]]:
    """{run: (stage-1 pairs seen, store version)}: the shorter stage-1 runs and the run's own."""
    pairs_per_step = config.posttrain.stage1.batch_size  # per process; the study trains in one
    steps = {name: variant.posttrain.stage1.steps for name, variant in trained_token_variants(config, run_dir).items()}
    steps["stage1"] = config.posttrain.stage1.steps
    return {name: (count * pairs_per_step, version_of(config, run_dir, name)) for name, count in steps.items()}


def negative_runs(config: MoonConfig, run_dir: Path) -> dict[str, tuple[int, str]]:
    """{run: (negatives per query, store version)}: stage 2 with each queue."""
    out = {}
    for name, variant in queue_variants(config).items():
        trained_variant(variant, run_dir, name, stage=2)
        out[name] = (negatives_per_query(variant), version_of(config, run_dir, name))
    return out


def tokens_axis(config: MoonConfig, run_dir: Path, runs: dict[str, tuple[int, str]], recall: dict[str, float],
                baseline: str) -> dict:
    lifts = cube_lifts(config, run_dir, [*(version for _, version in runs.values()), baseline])
    points = [{"name": name, "x": x, "version": version, "recall": recall[name],
               "cube_1_minus_auc": [1 - s["auc"] for _, s in sorted(lifts[version]["seeds"].items())],
               "delta_auc": lifts[version]["delta_auc"]} for name, (x, version) in runs.items()]
    cube_reference = 1 - np.mean([s["auc"] for s in lifts[baseline]["seeds"].values()])
    return {"x": "post-training pairs seen (stage 1)", "points": points,
            "recall": _fit([p["x"] for p in points], [1 - p["recall"] for p in points], 1 - recall["baseline"],
                           "1 - image R@10", "the baseline's image R@10"),
            "ctr": _fit(*_by_seed(points, "cube_1_minus_auc"), cube_reference,
                        "1 - test AUC of CUBE", "CUBE over the baseline's vectors")}


def negatives_axis(runs: dict[str, tuple[int, str]], recall: dict[str, float]) -> dict:
    points = [{"name": name, "x": x, "version": version, "recall": recall[name]}
              for name, (x, version) in runs.items()]
    return {"x": "negatives per query (stage 2)", "points": points,
            "recall": _fit([p["x"] for p in points], [1 - p["recall"] for p in points], 1 - recall["baseline"],
                           "1 - image R@10", "the baseline's image R@10")}


def length_axis(config: MoonConfig, run_dir: Path) -> dict:
    stage2 = version_of(config, run_dir, "stage2")
    points = []
    for length in config.study.behaviour_lengths:
        lifts = cube_lifts(config, run_dir, [stage2], f"ctr.max_len={length}")
        for model, seeds in (("din", lifts["din"]), ("cube", lifts[stage2]["seeds"])):
            points.append({"model": model, "x": length, "logloss": [s["logloss"] for _, s in sorted(seeds.items())],
                           "auc": [s["auc"] for _, s in sorted(seeds.items())]})
    fits = {}
    for model in ("din", "cube"):
        mine = [p for p in points if p["model"] == model]
        fits[model] = {"logloss": _fit(*_by_seed(mine, "logloss"), None, "test logloss", None),
                       "1 - auc": _fit(*_by_seed(mine, "auc", lambda v: 1 - v), None, "1 - test AUC", None)}
    return {"x": "behaviour sequence length (ctr.max_len)", "points": points, "fits": fits}


def _recall(config: MoonConfig, run_dir: Path, versions: dict[str, str]) -> dict[str, float]:
    reports = evaluate_versions(config, run_dir, list(versions.values()))
    return {name: intermediate_metrics(reports[version])[GUIDING] for name, version in versions.items()}


def _by_seed(points: list[dict], key: str, transform=lambda v: v) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for point in points:
        for value in point[key]:
            xs.append(point["x"])
            ys.append(transform(value))
    return xs, ys


def _fit(x: list[float], y: list[float], reference: float | None, quantity: str, reference_name: str | None) -> dict:
    """The chosen curve on every point, the held-out check on the largest x, and the x at which the
    curve reaches the reference (None: never, on this curve)."""
    try:
        curve = fit_curve(x, y)
    except (ValueError, RuntimeError) as exc:
        return {"quantity": quantity, "error": str(exc)}
    out = {"quantity": quantity, "curve": curve.to_dict()}
    try:
        out["held_out"] = held_out_check(x, y)
    except (ValueError, RuntimeError) as exc:
        out["held_out"] = {"error": f"no held-out check: {exc}"}
    if reference is not None:
        out["reference"] = {"name": reference_name, "value": reference, "reached_at": curve.reaches(reference),
                            "largest_x": max(x), "already": bool(min(curve(np.unique(x))) <= reference)}
    return out


def verdict(results: dict) -> str:
    """One paragraph from the figures: each curve's form and rate, its held-out error, and where a
    falling curve meets its reference."""
    sentences = []
    for axis, key in (("tokens", "recall"), ("tokens", "ctr"), ("negatives", "recall")):
        fit = results[axis][key]
        name = f"{results[axis]['x']} -> {fit['quantity']}"
        if "error" in fit:
            sentences.append(f"{name}: no fit ({fit['error']}).")
            continue
        sentence = f"{name}: {curve_from_dict(fit['curve']).describe()}"
        held = fit["held_out"]
        if "fit_without" in held:
            sentence += (f"; without its largest point the procedure chose {held['fit_without']['form']} and "
                         f"predicted that point {held['miss']:+.4f} off")
        sentence += _against_reference(fit.get("reference"), fit["curve"]["trend"])
        sentences.append(sentence + ".")
    for model, fits in results["behaviour_length"]["fits"].items():
        for fit in fits.values():
            if "curve" in fit:
                curve = curve_from_dict(fit["curve"])
                sentences.append(f"Behaviour length -> {model} {fit['quantity']}: {curve.describe()}.")
    return " ".join(sentences)


def _against_reference(reference: dict | None, trend: str) -> str:
    if not reference:
        return ""
    if reference["already"]:
        return f"; it is already past {reference['name']}"
    if reference["reached_at"] is not None:
        return (f"; it would reach {reference['name']} at about {reference['reached_at']:,.0f} "
                f"({reference['reached_at'] / reference['largest_x']:,.0f}× the largest x measured) if the curve holds")
    why = {"flat": "it is flat", "rises": "it moves away", "falls": "its floor is above"}[trend]
    return f"; it does not reach {reference['name']} ({why})"
