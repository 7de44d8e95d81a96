"""The statistics of the studies: exchange-rate slopes and saturating power laws.

- **Exchange rate** of an intermediate metric m: the downstream gain bought by +0.01 of m, the
  Theil-Sen slope of ΔAUC against m (robust to one odd version: the median of the pairwise
  slopes), times 0.01. Its interval is a bootstrap over versions and seeds: each resample draws
  versions with replacement and, for each, one of its seeds' ΔAUC. Beside it, Spearman's rank
  correlation, and the leave-one-version-out error: each version's ΔAUC predicted by the line
  fitted to the others.
- **Scaling law**: y = a·x^(−b) + c (a ≥ 0, b ≥ 0, c the floor; y a loss-like quantity that
  falls as x grows, e.g. 1 − recall or logloss), fitted by least squares with a soft-L1 loss
  (SciPy's `least_squares`) over every (x, seed) point. The held-out check refits without the
  largest x and predicts it.
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


@dataclass(frozen=True)
class PowerLaw:
    a: float
    b: float  # the exponent
    c: float  # the floor the curve saturates at
    r2: float  # on the points fitted

    def __call__(self, x) -> np.ndarray:
        return self.a * np.power(np.asarray(x, dtype=np.float64), -self.b) + self.c

    def reaches(self, level: float) -> float | None:
        """The x where the curve falls to `level`; None if it never does (its floor is above)."""
        if level <= self.c or self.a <= 0 or self.b <= 0:
            return None
        return float((self.a / (level - self.c)) ** (1 / self.b))


def fit_power_law(x, y) -> PowerLaw:
    """y = a·x^(−b) + c by soft-L1 least squares; x > 0, repeated x (seeds) allowed."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(np.unique(x)) < 3:
        raise ValueError(f"a saturating power law has 3 parameters: it needs at least 3 distinct x, got {np.unique(x)}")
    if (x <= 0).any():
        raise ValueError("a power law needs x > 0")
    scale = x.min()

    def residuals(p):
        a, b, c = p
        return a * (x / scale) ** (-b) + c - y

    span = max(float(np.ptp(y)), 1e-9)
    start = [max(float(y[x == x.min()].mean() - y.min()), span / 10), 0.5, float(y.min()) - span / 10]
    fit = optimize.least_squares(residuals, start, bounds=([0, 0, -np.inf], [np.inf, 10, np.inf]), loss="soft_l1",
                                 f_scale=span / 10)
    a, b, c = fit.x
    law = PowerLaw(float(a * scale**b), float(b), float(c), 0.0)
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - float(((law(x) - y) ** 2).sum()) / total if total > 0 else math.nan
    return PowerLaw(law.a, law.b, law.c, r2)


def held_out_check(x, y) -> dict:
    """Fits without the largest x and predicts it: the prediction, the mean observed there, the
    error, and whether the prediction lies within the observed seeds' 95% interval (normal, from
    their spread; None with a single seed)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    largest = x == x.max()
    law = fit_power_law(x[~largest], y[~largest])
    observed = y[largest]
    predicted = float(law(x.max()))
    half = 1.96 * observed.std(ddof=1) / math.sqrt(observed.size) if observed.size > 1 else None
    return {"x": float(x.max()), "predicted": predicted, "observed": float(observed.mean()),
            "error": predicted - float(observed.mean()),
            "within_seed_ci": None if half is None else bool(abs(predicted - observed.mean()) <= half),
            "fit_without": asdict(law)}
