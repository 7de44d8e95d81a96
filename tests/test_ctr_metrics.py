"""CTR metrics: AUC, logloss, gAUC by user and by request, their intervals, paired lifts, seed noise, segments."""
import json
import math
from statistics import NormalDist

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from moon.eval.metrics import (
    auc,
    auc_ci,
    auc_difference,
    ctr_lifts,
    ctr_metrics,
    grouped_auc,
    grouped_auc_ci,
    grouped_auc_difference,
    logloss,
    logloss_ci,
    logloss_difference,
    seed_noise,
    segment_metrics,
)

Z = NormalDist().inv_cdf(0.975)


def impressions(n, seed, signal=1.0, ctr=0.1, users=200, requests=800):
    """Synthetic test set: labels, click probabilities whose log-odds carry `signal` about the label,
    and user / request ids (strings)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < ctr).astype(np.int64)
    noise = rng.normal(size=n)
    probs = 1 / (1 + np.exp(-(noise + signal * y - 2)))
    user = np.array([f"user-{u}" for u in rng.integers(0, users, n)])
    request = np.array([f"req-{r}" for r in rng.integers(0, requests, n)])
    return y, probs, user, request, noise


def reference_gauc(y, scores, groups):
    """Slow loop: impression-weighted mean of per-group sklearn AUCs over groups with both labels."""
    num = den = 0.0
    for g in np.unique(groups):
        m = groups == g
        if 0 < y[m].sum() < m.sum():
            num += m.sum() * roc_auc_score(y[m], scores[m])
            den += m.sum()
    return num / den


# ---------------------------------------------------------------- AUC


def test_auc_equals_sklearn_on_data_with_ties():
    for seed in range(3):
        rng = np.random.default_rng(seed)
        y = (rng.random(3000) < 0.2).astype(int)
        scores = np.round(rng.normal(size=3000) + 0.7 * y, 1)  # ~60 distinct values: many ties
        assert len(np.unique(scores)) < 200
        assert auc(y, scores) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
        assert auc(y.astype(bool), scores) == auc(y.astype(float), scores)
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5  # all tied: every pair counts one half
    assert auc([0, 1], [0.9, 0.1]) == 0.0


def test_auc_rejects_one_class_and_bad_input():
    with pytest.raises(ValueError, match="both labels"):
        auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="0/1"):
        auc([-1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="3 scores"):
        auc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        auc([0, 1], [0.1, np.nan])


def test_delong_interval_matches_a_brute_force_variance():
    rng = np.random.default_rng(7)
    y = rng.random(400) < 0.3
    s = np.round(rng.normal(size=400) + y, 1)
    pos, neg = s[y], s[~y]
    wins = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])  # O(mn) placement values
    v10, v01 = wins.mean(axis=1), wins.mean(axis=0)
    se = math.sqrt(v10.var(ddof=1) / v10.size + v01.var(ddof=1) / v01.size)
    lo, hi = auc_ci(y, s)
    assert wins.mean() == pytest.approx(auc(y, s), abs=1e-12)
    assert (lo, hi) == pytest.approx((wins.mean() - Z * se, wins.mean() + Z * se), abs=1e-12)


def test_delong_se_agrees_with_a_bootstrap_se():
    y, probs, _, _, noise = impressions(20_000, seed=1)
    other = 1 / (1 + np.exp(-(0.6 * noise + 0.8 * np.random.default_rng(9).normal(size=y.size) + 1.2 * y - 2)))
    rng = np.random.default_rng(2)
    single, paired = [], []
    for _ in range(300):
        i = rng.integers(0, y.size, y.size)
        single.append(auc(y[i], probs[i]))
        paired.append(auc(y[i], other[i]) - single[-1])
    lo, hi = auc_ci(y, probs)
    assert (hi - lo) / (2 * Z) == pytest.approx(np.std(single, ddof=1), rel=0.15)
    _, dlo, dhi = auc_difference(y, probs, other)
    paired_se = (dhi - dlo) / (2 * Z)
    assert paired_se == pytest.approx(np.std(paired, ddof=1), rel=0.15)
    # the pairing matters: correlated models have a narrower paired interval than independent ones
    olo, ohi = auc_ci(y, other)
    assert paired_se < 0.8 * math.hypot((hi - lo) / (2 * Z), (ohi - olo) / (2 * Z))


# ---------------------------------------------------------------- logloss


def test_logloss_equals_sklearn_and_clips():
    rng = np.random.default_rng(3)
    y = (rng.random(5000) < 0.15).astype(int)
    p = rng.uniform(0.001, 0.999, 5000)
    assert logloss(y, p) == pytest.approx(log_loss(y, p), rel=1e-12)
    lo, hi = logloss_ci(y, p)
    losses = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    half = Z * losses.std(ddof=1) / math.sqrt(losses.size)
    assert (lo, hi) == pytest.approx((losses.mean() - half, losses.mean() + half), rel=1e-9)
    # a confident miss costs -log(1e-7), not infinity
    assert logloss([1, 0], [0.0, 1.0]) == pytest.approx(-math.log(1e-7), rel=1e-9)
    with pytest.raises(ValueError, match="sigmoid"):
        logloss([0, 1], [-0.5, 2.0])


# ---------------------------------------------------------------- gAUC


def test_grouped_auc_equals_a_per_group_reference_loop():
    y, probs, user, request, _ = impressions(4000, seed=4)
    scores = np.round(probs, 2)  # ties inside groups too
    single_class = sum(1 for g in np.unique(user) if y[user == g].min() == y[user == g].max())
    assert single_class > 0  # the data exercises the skip rule
    for groups in (user, request):
        assert grouped_auc(y, scores, groups) == pytest.approx(reference_gauc(y, scores, groups), abs=1e-12)
    # ids may be strings in any container, or integers: only the partition matters
    _, as_int = np.unique(user, return_inverse=True)
    expected = grouped_auc(y, scores, user)
    assert grouped_auc(y, scores, as_int * 7 + 3) == pytest.approx(expected, abs=1e-12)
    assert grouped_auc(y, scores, list(user)) == pytest.approx(expected, abs=1e-12)


def test_grouped_auc_skips_single_class_groups():
    y = np.array([0, 1, 0, 1] + [1] * 10)
    s = np.array([0.1, 0.9, 0.9, 0.1] + [0.5] * 10)
    g = np.array(["a", "a", "c", "c"] + ["b"] * 10)
    # a: AUC 1 (2 rows), c: AUC 0 (2 rows), b: clicks only (skipped, its 10 rows carry no weight)
    assert grouped_auc(y, s, g) == 0.5
    report = ctr_metrics(y, s, g, g)
    assert report["gauc_user"]["groups"] == 2 and report["gauc_user"]["skipped_groups"] == 1
    with pytest.raises(ValueError, match="no group holds both"):
        grouped_auc(y[4:6], s[4:6], g[4:6])
    with pytest.raises(ValueError, match="None"):
        grouped_auc([0, 1], [0.1, 0.2], ["a", None])


def test_grouped_auc_bootstrap_interval_is_seeded_and_covers_the_value():
    y, probs, user, _, _ = impressions(5000, seed=5)
    value = grouped_auc(y, probs, user)
    lo, hi = grouped_auc_ci(y, probs, user, seed=3)
    assert lo < value < hi
    assert (lo, hi) == grouped_auc_ci(y, probs, user, seed=3)
    assert (lo, hi) != grouped_auc_ci(y, probs, user, seed=4)


# ---------------------------------------------------------------- paired differences


def test_a_model_against_itself_differs_by_exactly_zero():
    y, probs, user, request, _ = impressions(5000, seed=6)
    assert auc_difference(y, probs, probs.copy()) == (0.0, 0.0, 0.0)
    assert logloss_difference(y, probs, probs.copy()) == (0.0, 0.0, 0.0)
    assert grouped_auc_difference(y, probs, probs.copy(), user) == (0.0, 0.0, 0.0)
    lifts = ctr_lifts(y, probs, probs.copy(), user, request)
    for key in ("auc", "logloss", "gauc_user", "gauc_request"):
        assert lifts[key]["delta"] == 0.0 and lifts[key]["ci"] == [0.0, 0.0], key


def test_a_clearly_better_model_has_an_interval_excluding_zero():
    y, weak, user, request, noise = impressions(20_000, seed=8, signal=0.4, users=1000, requests=4000)
    strong = 1 / (1 + np.exp(-(noise + 1.2 * y - 2)))  # same noise, more signal
    lifts = ctr_lifts(y, weak, strong, user, request, seed=1)
    assert lifts["auc"]["ci"][0] > 0
    assert lifts["gauc_user"]["ci"][0] > 0
    assert lifts["gauc_request"]["ci"][0] > 0
    assert lifts["logloss"]["ci"][1] < 0  # lower is better
    for key in ("auc", "logloss", "gauc_user", "gauc_request"):
        lo, hi = lifts[key]["ci"]
        assert lo < lifts[key]["delta"] < hi
    # each delta is the difference of the figures ctr_metrics reports for the two models
    base, model = ctr_metrics(y, weak, user, request), ctr_metrics(y, strong, user, request)
    for key in ("auc", "logloss", "gauc_user", "gauc_request"):
        assert lifts[key]["delta"] == pytest.approx(model[key]["value"] - base[key]["value"], abs=1e-12)
        assert lifts[key]["base"] == base[key]["value"] and lifts[key]["model"] == model[key]["value"]
    # swapping the models negates the delta
    assert auc_difference(y, strong, weak)[0] == -lifts["auc"]["delta"]


# ---------------------------------------------------------------- reports


def test_ctr_metrics_report_is_json_and_matches_the_functions():
    y, probs, user, request, _ = impressions(3000, seed=10)
    report = ctr_metrics(y, probs, user, request, seed=2)
    json.dumps(report, allow_nan=False)
    assert report["rows"] == 3000 and report["positives"] == int(y.sum())
    assert report["auc"] == {"value": auc(y, probs), "ci": list(auc_ci(y, probs))}
    assert report["logloss"] == {"value": logloss(y, probs), "ci": list(logloss_ci(y, probs))}
    assert report["gauc_user"]["value"] == pytest.approx(grouped_auc(y, probs, user), abs=1e-12)
    assert report["gauc_request"]["ci"] == list(grouped_auc_ci(y, probs, request, seed=2))
    # one row per request: no request holds both labels, so its gAUC is undefined (null), not an error
    single = ctr_metrics(y, probs, user, np.arange(y.size))
    assert single["gauc_request"]["value"] is None and single["gauc_request"]["groups"] == 0
    json.dumps(single, allow_nan=False)


def test_segment_with_one_class_is_reported_as_skipped():
    y, probs, user, request, _ = impressions(3000, seed=11)
    half = np.arange(y.size) < 1500
    out = segment_metrics(y, probs, user, request,
                          {"first_half": half, "clicked": y == 1, "none": np.zeros(y.size, bool)}, seed=0)
    assert out["clicked"] == {"skipped": "only clicked rows: AUC needs both labels",
                              "rows": int(y.sum()), "positives": int(y.sum())}
    assert out["none"]["skipped"] == "no rows"
    assert out["first_half"] == ctr_metrics(y[half], probs[half], user[half], request[half], seed=0)
    with pytest.raises(ValueError, match="boolean mask"):
        segment_metrics(y, probs, user, request, {"ids": np.arange(10)})


def test_seed_noise_is_the_sample_standard_deviation():
    assert seed_noise([0.70, 0.71, 0.72]) == pytest.approx(0.01, rel=1e-9)
    assert seed_noise([0.7, 0.7]) == 0.0
    assert math.isnan(seed_noise([0.7]))
    with pytest.raises(ValueError):
        seed_noise([])
