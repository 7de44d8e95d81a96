"""The statistics of the studies: exchange-rate slopes and scaling curves.

- **Exchange rate** of an intermediate metric m: the downstream gain bought by +0.01 of m, the
  Theil-Sen slope of ΔAUC against m (robust to one odd version: the median of the pairwise
  slopes), times 0.01. Its interval is a bootstrap over versions and seeds: each resample draws
  versions with replacement and, for each, one of its seeds' ΔAUC. Beside it, Spearman's rank
  correlation, and the leave-one-version-out error: each version's ΔAUC predicted by the line
  fitted to the others.
- **Scaling curve** of a loss-like y (1 − recall, logloss, 1 − AUC) against x: three forms
  compete, flat, log-linear and the saturating power law y = a·x^(−b) + c (soft-L1 least
  squares, SciPy's `least_squares`), and the one that best predicts each distinct x from the
  others wins. A power law is not forced on points that do not bend: a log-linear curve says
  the floor is not in sight, a flat one that x buys nothing measurable, and a rising one that
  more x hurts. The held-out check reruns the whole choice without the largest x and predicts it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import optimize, stats

ER_STEP = 0.01  # the exchange rate is quoted per +0.01 of the intermediate metric
RESAMPLES = 2000


@dataclass(frozen=True)
class ExchangeRate:
    rate: float  # ΔAUC per +ER_STEP of the metric (Theil-Sen)
    ci: tuple[float, float]  # 95% bootstrap interval over versions and seeds
    spearman: float
    spearman_p: float
    loo_error: float  # mean absolute leave-one-version-out error of the predicted ΔAUC
    spread: float  # standard deviation of ΔAUC over the versions: what the error is read against
    versions: int

    def to_dict(self) -> dict:
        return {key: (list(value) if isinstance(value, tuple) else value) for key, value in asdict(self).items()}


def exchange_rate(metric: np.ndarray, deltas: list[np.ndarray], seed: int = 0,
                  resamples: int = RESAMPLES) -> ExchangeRate:
    """`metric[k]` of version k against its seeds' ΔAUC `deltas[k]` (one value per seed)."""
    metric = np.asarray(metric, dtype=np.float64)
    if len(metric) != len(deltas) or len(metric) < 3:
        raise ValueError(f"an exchange rate needs at least 3 versions with a metric and ΔAUC each, got {len(metric)}")
    mean = np.array([np.mean(d) for d in deltas])
    slope = _slope(metric, mean)
    rng = np.random.default_rng(seed)
    drawn = []
    for _ in range(resamples):
        pick = rng.integers(0, len(metric), len(metric))
        if np.ptp(metric[pick]) == 0:
            continue  # one version drawn every time: no slope
        ys = np.array([deltas[k][rng.integers(0, len(deltas[k]))] for k in pick])
        drawn.append(_slope(metric[pick], ys))
    lo, hi = np.quantile(drawn, [0.025, 0.975]) if drawn else (math.nan, math.nan)
    rho, p = stats.spearmanr(metric, mean)
    errors = [abs(_predict(np.delete(metric, k), np.delete(mean, k), metric[k]) - mean[k]) for k in range(len(metric))]
    return ExchangeRate(slope * ER_STEP, (float(lo * ER_STEP), float(hi * ER_STEP)), _number(rho), _number(p),
                        float(np.mean(errors)), float(np.std(mean, ddof=1)), len(metric))


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    return float(stats.theilslopes(y, x).slope) if np.ptp(x) > 0 else math.nan


def _predict(x: np.ndarray, y: np.ndarray, at: float) -> float:
    fit = stats.theilslopes(y, x)
    return float(fit.intercept + fit.slope * at)


def _number(value) -> float:
    value = float(value)
    return value if math.isfinite(value) else math.nan


# ---------------------------------------------------------------- scaling curves

FORMS = ("flat", "log-linear", "power law")
_PARAMETERS = {"flat": 1, "log-linear": 2, "power law": 3}


@dataclass(frozen=True)
class Curve:
    """A fitted scaling curve of a loss-like y (lower is better) against x > 0:

    - `flat`: y = c, x buys nothing measurable;
    - `log-linear`: y = c + s·ln x, steady change per doubling, no floor in sight;
    - `power law`: y = a·x^(−b) + c with a, b, c ≥ 0, saturating at the floor c.
    """

    form: str
    params: dict[str, float]
    r2: float  # on the points fitted
    cv_error: dict[str, float]  # each form's leave-one-x-out mean absolute error: the choice and its margin

    def __call__(self, x) -> np.ndarray:
        return _evaluate(self.form, self.params, np.asarray(x, dtype=np.float64))

    @property
    def trend(self) -> str:
        """`falls` (more x helps), `rises` (more x hurts) or `flat`."""
        if self.form == "log-linear":
            return "falls" if self.params["s"] < 0 else "rises"
        if self.form == "power law" and self.params["a"] > 0 and self.params["b"] > 0:
            return "falls"
        return "flat"

    def reaches(self, level: float) -> float | None:
        """The x where a falling curve comes down to `level`; None where it never does."""
        if self.trend != "falls":
            return None
        if self.form == "log-linear":
            return float(math.exp((level - self.params["c"]) / self.params["s"]))
        a, b, c = self.params["a"], self.params["b"], self.params["c"]
        return None if level <= c else float((a / (level - c)) ** (1 / b))

    def describe(self) -> str:
        """The curve in words: its form, what a doubling of x does, where it saturates, and by what
        margin its form won."""
        if self.form == "flat":
            return f"flat: no form predicts left-out points better than their mean ({self._margin()})"
        if self.form == "log-linear":
            way = "falls" if self.trend == "falls" else "rises, so more of it hurts,"
            return (f"log-linear, {way} by {abs(self.params['s']) * math.log(2):.4f} per doubling with no floor "
                    f"in sight ({self._margin()})")
        return f"power law, {self.describe_briefly()}, R² {self.r2:.2f} ({self._margin()})"

    def describe_briefly(self) -> str:
        if self.form == "flat":
            return f"flat at {self.params['c']:.4f}"
        if self.form == "log-linear":
            return f"{self.params['s'] * math.log(2):+.4f} per doubling"
        floor = "no floor in sight (c = 0)" if self.params["c"] < 1e-6 else f"floor c = {self.params['c']:.4f}"
        return f"exponent b = {self.params['b']:.3f}, {floor}"

    def _margin(self) -> str:
        others = ", ".join(f"{form} {error:.4f}" for form, error in self.cv_error.items() if form != self.form)
        return f"leave-one-x-out error {self.cv_error[self.form]:.4f}" + (f" against {others}" if others else "")

    def to_dict(self) -> dict:
        return {**asdict(self), "trend": self.trend}


def fit_curve(x, y) -> Curve:
    """The form of the three with the smallest leave-one-x-out error (each distinct x in turn
    predicted by the form fitted to the others), refitted on every point. A form is a candidate
    only where every fold leaves it as many distinct x as it has parameters; ties go to the simpler."""
    x, y = _points(x, y)
    distinct = np.unique(x)
    errors = {}
    for form in FORMS:
        if len(distinct) - 1 < _PARAMETERS[form]:
            continue
        misses = []
        for left_out in distinct:
            kept = x != left_out
            params = _fit_form(form, x[kept], y[kept])
            misses.append(abs(float(_evaluate(form, params, left_out)) - float(y[~kept].mean())))
        errors[form] = float(np.mean(misses))
    if not errors:
        raise ValueError(f"a scaling curve needs at least 2 distinct x, got {distinct.tolist()}")
    form = min(errors, key=lambda name: (round(errors[name], 12), _PARAMETERS[name]))
    params = _fit_form(form, x, y)
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - float(((_evaluate(form, params, x) - y) ** 2).sum()) / total if total > 0 else math.nan
    return Curve(form, params, r2, errors)


def held_out_check(x, y) -> dict:
    """The whole procedure, choice of form included, run without the largest x, predicting it: the
    prediction, the mean observed there, the miss (predicted − observed), and whether the prediction lies within the
    observed seeds' 95% interval (normal, from their spread; None with a single seed)."""
    x, y = _points(x, y)
    largest = x == x.max()
    curve = fit_curve(x[~largest], y[~largest])
    observed = y[largest]
    predicted = float(curve(x.max()))
    half = 1.96 * observed.std(ddof=1) / math.sqrt(observed.size) if observed.size > 1 else None
    return {"x": float(x.max()), "predicted": predicted, "observed": float(observed.mean()),
            "miss": predicted - float(observed.mean()),
            "within_seed_ci": None if half is None else bool(abs(predicted - observed.mean()) <= half),
            "fit_without": curve.to_dict()}


def curve_from_dict(fitted: dict) -> Curve:
    return Curve(fitted["form"], fitted["params"], fitted["r2"], fitted["cv_error"])


def _points(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.size == 0:
        raise ValueError(f"a scaling curve needs one y per x, got {x.size} x and {y.size} y")
    if (x <= 0).any():
        raise ValueError("a scaling curve needs x > 0 (it is read on a log scale)")
    return x, y


def _evaluate(form: str, params: dict[str, float], x: np.ndarray) -> np.ndarray:
    if form == "flat":
        return np.full_like(x, params["c"], dtype=np.float64)
    if form == "log-linear":
        return params["c"] + params["s"] * np.log(x)
    return params["a"] * np.power(x, -params["b"]) + params["c"]


def _fit_form(form: str, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    if form == "flat":
        return {"c": float(y.mean())}
    if form == "log-linear":
        s, c = np.polyfit(np.log(x), y, 1)
        return {"c": float(c), "s": float(s)}
    return _fit_power_law(x, y)


def _fit_power_law(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """y = a·x^(−b) + c by soft-L1 least squares, x rescaled by its smallest value so that a
    starts near the curve's height; c ≥ 0 because y is a loss (1 − recall, logloss, 1 − AUC)."""
    scale = x.min()
    span = max(float(np.ptp(y)), 1e-9)
    start = [max(float(y[x == scale].mean() - y.min()), span / 10), 0.5, max(float(y.min()) - span / 10, 0.0)]
    fit = optimize.least_squares(lambda p: p[0] * (x / scale) ** (-p[1]) + p[2] - y, start,
                                 bounds=([0, 0, 0], [np.inf, 10, np.inf]), loss="soft_l1", f_scale=span / 10)
    a, b, c = (float(v) for v in fit.x)
    return {"a": a * scale**b, "b": b, "c": c}
