"""What a representation version buys downstream: CUBE over it against DIN, one fixed CTR setup.

`cube_lifts` trains (or reuses, `moon ctr train` keeps every run by its settings) DIN and CUBE
over each version for every seed of `ctr.seeds`, and returns each seed's test AUC and logloss,
and CUBE's paired ΔAUC over DIN seed by seed (the same seed's DIN).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from moon.config import MoonConfig
from moon.ctr.train import PREDICTIONS, RESULT, train
from moon.eval.metrics import auc, logloss
from moon.io.tables import read_table

BASE = "din"


def test_labels(run_dir: Path) -> np.ndarray:
    """The clicks of the test samples, in the order every run's test predictions are saved."""
    samples = read_table(run_dir, "ctr_samples", ["split", "label"])
    return samples.filter(pc.equal(samples["split"], "test"))["label"].to_numpy().astype(np.float32)


def seed_scores(folders: list[Path], labels: np.ndarray) -> dict[str, dict[int, dict]]:
    """{model: {seed: {"auc", "logloss", "label", "valid_auc"}}} of trained runs' folders (model: `din`, or the
    CUBE run's representation version)."""
    out: dict[str, dict[int, dict]] = {}
    for folder in folders:
        result = json.loads((folder / RESULT).read_text())
        probs = np.load(folder / PREDICTIONS)
        item = result.get("representations", {}).get("item_id")
        key = result["model"] if item is None else item["version"]
        out.setdefault(key, {})[result["seed"]] = {"auc": auc(labels, probs), "logloss": logloss(labels, probs),
                                                   "label": result["label"], "valid_auc": result["valid_auc"]}
    return out


def cube_lifts(config: MoonConfig, run_dir: Path, versions: list[str], *overrides: str) -> dict:
    """{"din": {seed: scores}, version: {"seeds": {seed: scores}, "delta_auc": [per seed], "delta_logloss": [...]}}."""
    setup = config.with_overrides(*overrides, f"ctr.representations=[{', '.join(versions)}]")
    scores = seed_scores(train(setup, run_dir, [BASE, "cube"]), test_labels(run_dir))
    base = scores.pop(BASE)
    out = {BASE: base}
    for version in versions:
        seeds = scores[version]
        out[version] = {"seeds": seeds, **{f"delta_{metric}": [seeds[s][metric] - base[s][metric] for s in sorted(seeds)]
                                           for metric in ("auc", "logloss")}}
    return out
