"""`moon ctr eval`: every trained CTR model scored on the test days, against DIN, per segment.

Scores come from the test predictions each trained run saved (`moon ctr train`), so eval
needs no model. For every model label (e.g. `cube@v1-stage2/64`):

- AUC, logloss, gAUC by user and by request: the mean over seeds, the seed standard
  deviation (the noise floor) and the 95% interval of one run (the first seed) on the test
  set (docs/metrics.md says how each is made);
- its lift over DIN: the mean over seeds of the paired difference, the paired 95% interval of
  the first seed, and the noise floor beside it: the spread of a difference between one run
  of each model, sqrt(std_model^2 + std_din^2) over seeds;
- the same per segment (`moon.ctr.segments`), as AUC and lift in AUC over DIN;
- on a simulated log, the ceilings beside them (`moon.eval.world.ceilings`: those `moon eval
  world` saved, else fitted anew): the test AUC of logistic models on the click model's truth
  (position only, + item appeal, + true relevance, + true fit) and of the true click
  probability, so a lift reads against the headroom the world leaves.

Results go to `eval/ctr.json`; the report renders them.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from moon import ui
from moon.config import MoonConfig
from moon.ctr.data import CtrData
from moon.ctr.features import load_spec
from moon.ctr.segments import test_segments
from moon.ctr.train import PREDICTIONS, RESULT, SETTINGS
from moon.errors import UserError
from moon.eval.metrics import auc, ctr_lifts, ctr_metrics, grouped_auc, logloss, seed_noise
from moon.eval.world import ceilings, print_ceilings
from moon.io.atomic import atomic_json
from moon.io.tables import read_manifest
from moon.run import RunDir

BASE = "din"
METRICS = ("auc", "gauc_user", "gauc_request", "logloss")


def evaluate(config: MoonConfig, run_dir: Path) -> dict:
    run = RunDir(run_dir)
    data = CtrData.load(run_dir, load_spec(config))
    runs = trained_runs(run_dir, config)
    if not runs:
        raise UserError(f"no CTR model in {run.ctr_models} was trained on the current samples with these settings: "
                        "run `moon ctr train` with the same config and overrides first")
    test = data.splits["test"]
    labels, users, requests = data.samples["label"][test], data.user_ids[test], data.request_ids[test]
    segments = test_segments(config, data)
    models = {}
    for name, seeds in runs.items():
        models[name] = score(labels, users, requests, seeds, config.seed)
        models[name]["segments"] = segment_scores(labels, seeds, segments)
    base = next((name for name in models if name == BASE), None)
    if base is not None:
        for name, seeds in runs.items():
            if name != base:
                models[name]["lift"] = lift(labels, users, requests, runs[base], seeds, models, base, name, config.seed)
                models[name]["segment_lift"] = segment_lift(models[base]["segments"], models[name]["segments"])
    manifest = read_manifest(run_dir, "ctr_samples")
    results = {"base": base, "test_days": manifest["days"]["test"], "test_rows": len(test),
               "test_clicks": int(labels.sum()), "segments": {k: int(v.sum()) for k, v in segments.items()},
               "models": models}
    ceiling = ceilings(config, run_dir)
    if ceiling:
        results["ceilings"] = ceiling
    run.eval.mkdir(parents=True, exist_ok=True)
    atomic_json(run.ctr_results, results)
    return results


def trained_runs(run_dir: Path, config: MoonConfig) -> dict[str, dict[int, np.ndarray]]:
    """{label: {seed: test predictions}} of the runs trained on the current samples with the
    current training settings (runs of other settings stay on disk for when they are asked for)."""
    current = read_manifest(run_dir, "ctr_samples")["created_at"]
    wanted = {key: getattr(config.ctr, key) for key in SETTINGS}
    runs: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    for result_file in sorted(RunDir(run_dir).ctr_models.glob(f"*/seed-*/{RESULT}")):
        result = json.loads(result_file.read_text())
        if result["samples"] == current and all(result.get(key) == value for key, value in wanted.items()) \
                and result["seed"] in config.ctr.seeds:
            runs[result["label"]][result["seed"]] = np.load(result_file.parent / PREDICTIONS)
    order = {"dnn": 0, "din": 1}
    return dict(sorted(runs.items(), key=lambda item: (order.get(item[0], 2), item[0])))


def point_metrics(labels, probs, users, requests) -> dict[str, float | None]:
    """The four metrics' values alone (intervals cost resamples: only the first seed gets them)."""
    values = {"auc": auc(labels, probs), "logloss": logloss(labels, probs)}
    for metric, groups in (("gauc_user", users), ("gauc_request", requests)):
        try:
            values[metric] = grouped_auc(labels, probs, groups)
        except ValueError:  # no group holds both labels
            values[metric] = None
    return values


def score(labels, users, requests, seeds: dict[int, np.ndarray], seed: int) -> dict:
    per_seed = {s: point_metrics(labels, p, users, requests) for s, p in sorted(seeds.items())}
    first = ctr_metrics(labels, seeds[min(seeds)], users, requests, seed)
    out = {"seeds": sorted(per_seed), "per_seed": per_seed}
    for metric in METRICS:
        values = [m[metric] for m in per_seed.values() if m[metric] is not None]
        out[metric] = {"mean": float(np.mean(values)) if values else None, "seed_std": _noise(values),
                       "ci_first_seed": first[metric]["ci"]}
    return out


def lift(labels, users, requests, base_seeds, model_seeds, models, base, name, seed: int) -> dict:
    """Paired lifts over the base model, seed by seed (seeds both have): on the same test rows the
    paired difference is the difference of the two values; its interval is the first seed's."""
    shared = sorted(set(base_seeds) & set(model_seeds))
    if not shared:
        return {}
    first = ctr_lifts(labels, base_seeds[shared[0]], model_seeds[shared[0]], users, requests, seed)
    out = {"seeds": shared}
    for metric in METRICS:
        pairs = [(models[name]["per_seed"][s][metric], models[base]["per_seed"][s][metric]) for s in shared]
        deltas = [a - b for a, b in pairs if a is not None and b is not None]
        noise = [models[n][metric]["seed_std"] for n in (base, name)]
        # The spread of a difference between one run of each model: both seed spreads combined.
        floor = float(np.sqrt(np.sum(np.square(noise)))) if all(v is not None for v in noise) else None
        out[metric] = {"delta": float(np.mean(deltas)) if deltas else None, "ci_first_seed": first[metric]["ci"],
                       "noise_floor": floor}
    return out


def segment_scores(labels, seeds: dict[int, np.ndarray], segments: dict[str, np.ndarray]) -> dict:
    """AUC per segment: mean over seeds and seed std (segments without both labels are skipped)."""
    out = {}
    for name, mask in segments.items():
        rows, positives = int(mask.sum()), int(labels[mask].sum())
        if positives in (0, rows):
            out[name] = {"skipped": "AUC needs both clicked and unclicked rows", "rows": rows}
            continue
        values = [auc(labels[mask], p[mask]) for _, p in sorted(seeds.items())]
        out[name] = {"auc": float(np.mean(values)), "seed_std": _noise(values), "per_seed": values,
                     "rows": rows, "positives": positives}
    return out


def segment_lift(base: dict, model: dict) -> dict:
    """Per segment: the mean over shared seeds of the model's AUC minus the base's."""
    out = {}
    for name, entry in model.items():
        if "auc" not in entry or "auc" not in base.get(name, {}):
            continue
        shared = min(len(entry["per_seed"]), len(base[name]["per_seed"]))
        deltas = np.array(entry["per_seed"][:shared]) - np.array(base[name]["per_seed"][:shared])
        out[name] = {"delta_auc": float(deltas.mean()), "seed_std": _noise(deltas.tolist()), "rows": entry["rows"]}
    return out


def _noise(values: list[float]) -> float | None:
    if len(values) < 2:
        return None
    return seed_noise(values)


def print_results(results: dict) -> None:
    rows = []
    for name, model in results["models"].items():
        lifted = model.get("lift", {}).get("auc", {})
        rows.append((name, len(model["seeds"]), model["auc"]["mean"], _fmt_std(model["auc"]["seed_std"]),
                     _fmt_ci(model["auc"]["ci_first_seed"]), model["gauc_user"]["mean"] or float("nan"),
                     model["logloss"]["mean"], _fmt_delta(lifted.get("delta")), _fmt_std(lifted.get("noise_floor"))))
    ui.print_table(f"CTR on the test days ({results['test_rows']:,} impressions, {results['test_clicks']:,} clicks)",
                   rows, ("model", "seeds", "AUC", "seed std", "95% CI (1st seed)", "gAUC user", "logloss",
                          f"ΔAUC vs {results['base']}", "noise"))
    # Segments for the models compared in the demo; ablations (-no_<branch>, -top<K>) stay in eval/ctr.json.
    names = [n for n, m in results["models"].items() if m.get("segment_lift") and "-no_" not in n and "-top" not in n]
    if names:
        segments = list(results["models"][names[0]]["segment_lift"])
        rows = [(segment, results["segments"].get(segment, 0),
                 *(_fmt_delta(results["models"][n]["segment_lift"].get(segment, {}).get("delta_auc")) for n in names))
                for segment in segments]
        ui.print_table(f"ΔAUC over {results['base']} by segment (mean over seeds)", rows, ("segment", "rows", *names))
    if "ceilings" in results:
        print_ceilings(results["ceilings"])


def print_saved(run_dir: Path) -> None:
    path = RunDir(run_dir).ctr_results
    if path.is_file():
        print_results(json.loads(path.read_text()))


def _fmt_std(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _fmt_ci(ci) -> str:
    return "-" if not ci else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def _fmt_delta(value) -> str:
    return "-" if value is None else f"{value:+.4f}"
