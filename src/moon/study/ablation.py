"""`moon study ablation`: what each part of CUBE buys, over several representation versions.

For every version of `study.ablation_versions` (by default the oracle's true-facts vectors,
the stage-2 model's and the non-learned baseline's), CUBE is trained as configured and once
more with each entry of `study.ablations` applied (a name and the config overrides that make
the variant: a part taken away, `no histogram: [ctr.cube.histogram=false]`, or one added,
`+ fusion: [ctr.cube.fusion=true]`), every seed of `ctr.seeds`, with
DIN beside it under the same overrides (an ablation of the behaviour sequence itself, such as
`ctr.distinct_items=false`, changes DIN too). `moon ctr train` keeps every run by its settings,
so a rerun trains only what it lacks.

Per version and variant: CUBE as configured minus the variant, paired by seed on the valid
days (where choices are made) and on the test days, the mean and the seed noise (the standard
deviation of the paired differences), so a positive figure is what the configured CUBE gains
over the variant; and CUBE's lift over DIN. Results go to `study/ablation.json`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moon import ui
from moon.config import MoonConfig
from moon.ctr.train import train
from moon.eval.metrics import seed_noise
from moon.io.atomic import atomic_json
from moon.study.downstream import seed_scores, test_labels
from moon.study.variants import study_dir, version_of

RESULTS = "ablation.json"
FULL = "full"


def results_path(run_dir: Path) -> Path:
    return study_dir(run_dir) / RESULTS


def study_ablation(config: MoonConfig, run_dir: Path) -> dict:
    labels = test_labels(run_dir)
    versions = {name: version_of(config, run_dir, name) for name in config.study.ablation_versions}
    settings = {FULL: [], **config.study.ablations}
    results = {"versions": versions, "seeds": config.ctr.seeds, "ablations": settings, "by_version": {}}
    for name, version in versions.items():
        scores = {}
        for ablation, overrides in settings.items():
            setup = config.with_overrides(*overrides, f"ctr.representations={version}")
            din, cube = train(setup, run_dir, ["din"]), train(setup, run_dir, ["cube"])
            scores[ablation] = {"din": _scores(din, labels), "cube": _scores(cube, labels)}
        results["by_version"][name] = compare(scores)
    atomic_json(results_path(run_dir), results)
    return results


def _scores(folders: list[Path], labels: np.ndarray) -> dict[str, list[float]]:
    """{"valid": [per seed], "test": [per seed]} AUCs of one model's runs, in seed order."""
    (seeds,) = seed_scores(folders, labels).values()
    return {"valid": [seeds[s]["valid_auc"] for s in sorted(seeds)], "test": [seeds[s]["auc"] for s in sorted(seeds)]}


def compare(scores: dict[str, dict]) -> dict:
    """CUBE's lift over DIN, and per ablation the full CUBE's AUC minus the ablated one's, paired
    by seed: {"cube over din": {...}, ablation: {split: {"delta", "noise", "per_seed"}}}."""
    full = scores[FULL]["cube"]
    out = {"cube over din": _paired(full, scores[FULL]["din"])}
    for ablation, ablated in scores.items():
        if ablation != FULL:
            out[ablation] = _paired(full, ablated["cube"])
    return out


def _paired(a: dict[str, list[float]], b: dict[str, list[float]]) -> dict:
    out = {}
    for split in ("valid", "test"):
        deltas = np.array(a[split]) - np.array(b[split])
        out[split] = {"delta": float(deltas.mean()), "noise": seed_noise(deltas), "per_seed": deltas.tolist()}
    return out


def print_ablation(results: dict) -> None:
    names = list(results["by_version"])
    rows = []
    for row in next(iter(results["by_version"].values())):
        cells = []
        for name in names:
            entry = results["by_version"][name][row]
            cells += [_cell(entry["valid"]), _cell(entry["test"])]
        rows.append((row, *cells))
    columns = [f"{name} {split}" for name in names for split in ("valid", "test")]
    ui.print_table(f"CUBE ablation: AUC of CUBE as configured minus the variant's; first row, CUBE minus DIN "
                   f"(mean ± seed noise of the paired differences, {len(results['seeds'])} seeds)", rows,
                   ("variant", *columns))


def _cell(entry: dict) -> str:
    noise = entry["noise"]
    return f"{entry['delta']:+.4f}" + ("" if noise != noise else f" ± {noise:.4f}")
