"""The studies: their statistics on curves of known shape, and both studies end to end on the tiny world."""

import json
import shutil

import numpy as np
import pytest

from conftest import TINY_MODEL, TINY_WORLD
from moon.config import load_config
from moon.ctr.samples import build_samples
from moon.pairs.build import build_pairs
from moon.run import RunDir
from moon.store.versions import Store
from moon.study.exchange_rate import METRICS, study_exchange_rate
from moon.study.fit import curve_from_dict, exchange_rate, fit_curve, held_out_check
from moon.study.scaling import study_scaling
from moon.train import posttrain


def test_the_exchange_rate_recovers_a_known_slope_and_sees_no_rate_in_noise():
    rng = np.random.default_rng(0)
    metric = np.linspace(0.1, 0.8, 8)
    deltas = [0.02 * m + rng.normal(0, 0.0005, 3) for m in metric]  # +0.0002 AUC per +0.01
    rate = exchange_rate(metric, deltas)
    assert rate.rate == pytest.approx(0.0002, rel=0.15)
    assert rate.ci[0] < 0.0002 < rate.ci[1] and rate.ci[0] > 0
    assert rate.spearman > 0.9 and rate.loo_error < 0.25 * rate.spread

    unrelated = rng.permutation(metric)
    flat = [rng.normal(0.003, 0.002, 3) for _ in metric]
    noise = exchange_rate(unrelated, flat)
    assert noise.ci[0] < 0 < noise.ci[1] and noise.loo_error > 0.5 * noise.spread

    with pytest.raises(ValueError, match="at least 3 versions"):
        exchange_rate(metric[:2], deltas[:2])


def test_a_saturating_power_law_is_recovered_and_its_largest_point_predicted():
    x = np.repeat([100, 200, 400, 800, 1600, 3200], 3)
    rng = np.random.default_rng(1)
    y = 2.0 * x ** -0.5 + 0.1 + rng.normal(0, 0.001, x.size)
    curve = fit_curve(x, y)
    assert curve.form == "power law" and curve.trend == "falls"
    assert curve.params["b"] == pytest.approx(0.5, abs=0.05) and curve.params["c"] == pytest.approx(0.1, abs=0.01)
    assert curve.r2 > 0.99 and curve.cv_error["power law"] < curve.cv_error["log-linear"] < curve.cv_error["flat"]
    held = held_out_check(x, y)
    assert held["x"] == 3200 and abs(held["miss"]) < 0.005 and held["fit_without"]["form"] == "power law"
    assert held["within_seed_ci"] in (True, False)
    assert curve.reaches(0.12) == pytest.approx(10_000, rel=0.2)  # 2 x^-0.5 = 0.02 -> x = 10,000
    assert curve.reaches(0.05) is None  # below the floor: never
    assert curve_from_dict(curve.to_dict()) == curve
    with pytest.raises(ValueError, match="at least 2 distinct x"):
        fit_curve([1, 1], [3, 3])


def test_a_curve_that_does_not_bend_is_not_forced_into_a_power_law():
    x = np.repeat([32, 64, 128, 256, 512], 3)
    rng = np.random.default_rng(2)
    rising = 0.5 + 0.03 * np.log(x) + rng.normal(0, 0.002, x.size)  # more negatives, worse recall
    curve = fit_curve(x, rising)
    assert curve.form == "log-linear" and curve.trend == "rises"
    assert curve.params["s"] == pytest.approx(0.03, abs=0.005)
    assert curve.reaches(0.4) is None and "rises" in curve.describe()

    flat = 0.36 + rng.normal(0, 0.002, x.size)  # behaviour length that buys nothing
    curve = fit_curve(x, flat)
    assert curve.form == "flat" and curve.trend == "flat" and curve.reaches(0.3) is None

    falling = 1.7 - 0.09 * np.log(x) + rng.normal(0, 0.002, x.size)  # steady gain per doubling, no floor yet
    curve = fit_curve(x, falling)
    assert curve.form == "log-linear" and curve.trend == "falls"
    assert curve.reaches(1.0) == pytest.approx(np.exp(0.7 / 0.09), rel=0.2)


# ---------------------------------------------------------------- end to end on the tiny world

STUDY = [
    *TINY_WORLD, *TINY_MODEL, "name=tiny", "store.partitions=2",
    "posttrain.from_pretrained=false", "posttrain.stage1.steps=4", "posttrain.stage1.batch_size=8",
    "posttrain.stage1.warmup_steps=0", "posttrain.stage2.steps=2", "posttrain.stage2.batch_size=4",
    "study.versions=[baseline, untrained, stage1, stage2, random, truth]", "study.token_fractions=[0.25, 0.5]",
    "study.queue_sizes=[0, 4, 12]", "study.behaviour_lengths=[2, 4, 8]",
    "ctr.seeds=[0, 1]", "ctr.max_epochs=1", "ctr.batch_size=256", "ctr.hidden=[16]", "ctr.embedding_dim=8",
    "ctr.query_max_len=4",
]


def study_config(*overrides):
    return load_config(None, [*STUDY, *overrides])


@pytest.fixture(scope="module")
def studied(tiny_world, tmp_path_factory):
    """The tiny world with pairs, both post-training stages, CTR samples, and both studies run once."""
    run_dir = tmp_path_factory.mktemp("study")
    for table in ("items", "item_truth", "users", "events", "query_truth"):
        shutil.copytree(tiny_world / table, run_dir / table)
    config = study_config()
    build_pairs(config, run_dir)
    posttrain.posttrain(config, run_dir, stage=1)
    posttrain.posttrain(config, run_dir, stage=2)
    build_samples(config, run_dir)
    return run_dir, study_exchange_rate(config, run_dir), study_scaling(config, run_dir)


def test_the_exchange_rate_compares_every_version_on_every_metric(studied):
    run_dir, results, _ = studied
    labels = [row["label"] for row in results["versions"]]
    assert labels == ["baseline", "untrained", "stage1", "stage2", "random", "truth", "stage1-steps1", "stage1-steps2"]
    assert len({row["version"] for row in results["versions"]}) == len(labels)
    by_label = {row["label"]: row for row in results["versions"]}
    # The oracle's photo query is the photographed item's own vector; the placebo's knows nothing.
    assert by_label["truth"]["metrics"]["image R@10"] > 0.8 > by_label["random"]["metrics"]["image R@100"]
    assert all(len(row["delta_auc"]) == 2 for row in results["versions"])
    assert set(results["rates"]) == set(METRICS)
    assert results["verdict"]["best"] in METRICS and results["verdict"]["text"]
    assert json.loads((run_dir / "study" / "exchange_rate.json").read_text())["verdict"] == results["verdict"]


def test_a_rerun_computes_nothing_again(studied):
    run_dir, results, _ = studied
    run = RunDir(run_dir)
    versions, ctr_runs = Store(run_dir).versions(), sorted(run.ctr_models.glob("*/seed-*"))
    models = {path.name: path.stat().st_mtime_ns for path in (run_dir / "study" / "models").iterdir()}
    again = study_exchange_rate(study_config(), run_dir)
    assert [row["delta_auc"] for row in again["versions"]] == [row["delta_auc"] for row in results["versions"]]
    assert Store(run_dir).versions() == versions and sorted(run.ctr_models.glob("*/seed-*")) == ctr_runs
    assert {path.name: path.stat().st_mtime_ns for path in (run_dir / "study" / "models").iterdir()} == models


def test_scaling_has_three_axes_with_fits_and_held_out_checks(studied):
    _, _, results = studied
    tokens = results["tokens"]
    assert [p["x"] for p in tokens["points"]] == [8, 16, 32]  # 1, 2 and 4 steps of 8 pairs
    assert [p["x"] for p in results["negatives"]["points"]] == [3, 7, 15]  # batch 4 - 1 + queue
    lengths = results["behaviour_length"]["points"]
    assert sorted({(p["model"], p["x"]) for p in lengths}) == [(m, x) for m in ("cube", "din") for x in (2, 4, 8)]
    for fit in (tokens["recall"], tokens["ctr"], results["negatives"]["recall"]):
        assert fit["curve"]["form"] in ("flat", "log-linear") and "held_out" in fit  # 3 x: too few for a power law
        assert fit["held_out"]["fit_without"]["form"] == "flat"  # 2 x left: only the mean can be checked
    assert "curve" in results["behaviour_length"]["fits"]["din"]["logloss"]  # 3 lengths x 2 seeds


def test_the_ablation_pairs_each_part_of_cube_against_the_full_model_by_seed(studied):
    from moon.study.ablation import print_ablation, results_path, study_ablation

    run_dir, _, _ = studied
    config = study_config("study.ablation_versions=[truth, stage2]",
                          "study.ablations={history: [ctr.cube.content=false, ctr.cube.fusion=false, "
                          "ctr.cube.query_sequence=false, ctr.cube.histogram=false], "
                          "distinct items: [ctr.distinct_items=false]}")
    results = study_ablation(config, run_dir)
    assert list(results["by_version"]) == ["truth", "stage2"]
    for rows in results["by_version"].values():
        assert list(rows) == ["cube over din", "history", "distinct items"]
        for row in rows.values():
            for split in ("valid", "test"):
                assert len(row[split]["per_seed"]) == 2 and row[split]["noise"] >= 0
                assert row[split]["delta"] == pytest.approx(np.mean(row[split]["per_seed"]))
        assert any(d != 0 for d in rows["history"]["valid"]["per_seed"])  # the ablated model is another model
    assert json.loads(results_path(run_dir).read_text())["by_version"] == results["by_version"]
    runs = sorted(RunDir(run_dir).ctr_models.glob("*/seed-*"))
    assert study_ablation(config, run_dir)["by_version"] == results["by_version"]  # a rerun trains nothing
    assert sorted(RunDir(run_dir).ctr_models.glob("*/seed-*")) == runs
    print_ablation(results)


def test_a_first_study_result_makes_its_folder(tmp_path):
    """A demo run has no study folder until a study writes one (atomic writes make their folder)."""
    from moon.io.atomic import atomic_json
    from moon.study.ablation import results_path

    path = atomic_json(results_path(tmp_path), {"by_version": {}})
    assert json.loads(path.read_text()) == {"by_version": {}} and [p.name for p in path.parent.iterdir()] == [path.name]
