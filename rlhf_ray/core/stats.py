"""Statistics for results over seeds, with intervals that keep their coverage at 5 seeds.

A percentile bootstrap over 5 seeds covers about 88%, not 95% (it ignores that the spread is
itself estimated from 5 values). Measured at 5 normal seeds a variant in
`tests/unit/test_stats.py`: Fieller 0.950, t 0.946, the percentile bootstrap 0.878; the IQM's
stratified BCa over 4 tasks x 5 seeds with the baseline resampled 0.925 (0.873 with the
baseline's mean taken as known). So:

- the mean of one variant's runs: Student's t interval (exact for normal runs);
- a ratio of two variants' means over a floor, (mean(x) - floor) / (mean(y) - floor), the
  two resampled independently (seeds are not paired): Fieller's interval, the t interval
  for a ratio, with Welch's degrees of freedom. Where the denominator's own interval reaches
  the floor the set is unbounded, and the interval is reported as such (nan, `bounded:
  false`), not as a number;
- the interquartile mean (IQM) over tasks (Agarwal et al. 2021, rliable's
  `aggregate_iqm`) and the probability of improvement (rliable's
  `probability_of_improvement`, the Mann-Whitney statistic averaged over tasks): a
  stratified BCa bootstrap, each task's runs resampled on their own, and the baseline runs
  that normalize each task resampled too. BCa corrects the percentile interval's bias and
  skew.

rliable itself is not a dependency: rliable 1.2.0 needs `arch < 8`, which fails to import
under pandas 3 (this project's dependency set), and arch 8 drops an argument rliable passes.
The computations are scipy's (`stats.t`, `stats.trim_mean`, `stats.bootstrap`).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import numpy as np
from scipy import stats

REPS = 10_000
NAN2 = [float("nan"), float("nan")]


def iqm(x: Sequence[float]) -> float:
    """Interquartile mean: the mean of the middle 50% of the values."""
    return float(stats.trim_mean(np.asarray(x, dtype=float), 0.25))


def mean_ci(x: Sequence[float], level: float = 0.95, seed: int = 0) -> dict:
    """Mean of the runs with Student's t interval (n - 1 degrees of freedom). `seed` is
    unused (kept for callers of the bootstrap version)."""
    x = np.asarray(x, dtype=float)
    n = len(x)
    if n == 0:
        return {"mean": float("nan"), "ci95": NAN2, "n": 0, "method": "t"}
    m = float(x.mean())
    if n < 2:  # one run: no spread to go on
        return {"mean": m, "ci95": NAN2, "n": 1, "method": "t"}
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return {"mean": m, "ci95": [m - half, m + half], "n": int(n), "method": "t"}


def fieller(x: Sequence[float], y: Sequence[float], level: float = 0.95,
            floor: float = 0.0) -> tuple[float, float, bool]:
    """Fieller's interval for (mean(x) - floor) / (mean(y) - floor), x and y independent
    samples: the ratios r for which mean(x') - r mean(y') is within its t interval of 0,
    with Welch's degrees of freedom (taken at the estimate). Returns (low, high, bounded)."""
    x = np.asarray(x, dtype=float) - floor
    y = np.asarray(y, dtype=float) - floor
    mx, my = x.mean(), y.mean()
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    r = mx / my
    num = (vx + r * r * vy) ** 2
    den = vx * vx / (len(x) - 1) + (r * r * vy) ** 2 / (len(y) - 1)
    df = num / den if den > 0 else float(len(x) + len(y) - 2)
    t2 = float(stats.t.ppf(0.5 + level / 2, df)) ** 2
    a = my * my - t2 * vy  # the quadratic a r^2 + b r + c <= 0 in the ratio r
    b = -2.0 * mx * my
    c = mx * mx - t2 * vx
    disc = b * b - 4 * a * c
    if a <= 0 or disc < 0:  # the denominator is not clearly away from the floor
        return float("nan"), float("nan"), False
    root = math.sqrt(disc)
    lo, hi = (-b - root) / (2 * a), (-b + root) / (2 * a)
    return float(lo), float(hi), True


def ratio_ci(x: Sequence[float], y: Sequence[float], level: float = 0.95, seed: int = 0,
             floor: float = 0.0) -> dict:
    """(mean(x) - floor) / (mean(y) - floor) with Fieller's interval (`fieller`), x's and
    y's runs independent (two variants' seeds are not paired). `floor`: the score that
    counts as nothing (a random policy's return), so a ratio means the same on tasks whose
    returns are negative (Reacher, HalfCheetah's random policy, Pong): 1 is y's score, 0 the
    floor's. `seed` is unused."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    out = {"n": [int(len(x)), int(len(y))], "floor": floor, "method": "fieller"}
    if not len(x) or not len(y) or y.mean() == floor:
        return {"ratio": float("nan"), "ci95": NAN2, "bounded": False, **out}
    ratio = float((x.mean() - floor) / (y.mean() - floor))
    if len(x) < 2 or len(y) < 2:
        return {"ratio": ratio, "ci95": NAN2, "bounded": False, **out}
    if np.ptp(x) == 0 and np.ptp(y) == 0:
        return {"ratio": ratio, "ci95": [ratio, ratio], "bounded": True, **out}
    lo, hi, bounded = fieller(x, y, level, floor)
    return {"ratio": ratio, "ci95": [lo, hi], "bounded": bounded, **out}


def _bca(samples: list[np.ndarray], statistic: Callable, level: float,
         seed: int) -> list[float]:
    """A BCa interval over independently resampled samples (NaN where one has a single run;
    the value itself where nothing varies)."""
    if any(len(s) < 2 for s in samples):
        return NAN2
    if all(np.ptp(s) == 0 for s in samples):
        v = float(statistic(*samples, axis=-1))
        return [v, v]
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap(samples, statistic, n_resamples=REPS, paired=False,
                              vectorized=True, confidence_level=level, method="BCa",
                              rng=np.random.default_rng(seed))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if lo != lo or hi != hi:  # BCa is undefined where (nearly) every resample ties
        dist = res.bootstrap_distribution
        lo, hi = (float(q) for q in np.nanquantile(dist, [0.5 - level / 2, 0.5 + level / 2]))
    return [lo, hi]


def _normalized(runs: list[np.ndarray], bases: list[np.ndarray] | None,
                floors: Sequence[float] | None, axis: int = -1) -> list[np.ndarray]:
    """Each task's runs as (run - floor) / (mean(baseline runs) - floor)."""
    if bases is None:
        return runs
    return [(r - f) / (np.mean(b, axis=axis, keepdims=True) - f)
            for r, b, f in zip(runs, bases, floors)]


def iqm_ci(per_task: Sequence[Sequence[float]], level: float = 0.95, seed: int = 0,
           baselines: Sequence[Sequence[float]] | None = None,
           floors: Sequence[float] | None = None) -> dict:
    """IQM over all runs of all tasks with a stratified BCa interval: each task's runs are
    resampled on their own, as rliable does. With `baselines` (and `floors`), `per_task`
    holds raw scores, each task normalized by its baseline runs' mean over its floor, and
    the baseline runs are resampled too (the normalization's own uncertainty); without,
    the scores are already normalized."""
    runs = [np.asarray(t, dtype=float) for t in per_task]
    bases = None if baselines is None else [np.asarray(b, dtype=float) for b in baselines]
    floors = list(floors) if floors is not None else [0.0] * len(runs)
    k = len(runs)
    pooled = np.concatenate(_normalized(runs, bases, floors)) if runs else np.zeros(0)

    def statistic(*samples, axis=-1):
        norm = _normalized(list(samples[:k]), list(samples[k:]) if bases else None, floors,
                           axis)
        return stats.trim_mean(np.concatenate(norm, axis=axis), 0.25, axis=axis)

    ci = _bca(runs + (bases or []), statistic, level, seed) if runs else NAN2
    return {"iqm": iqm(pooled) if len(pooled) else float("nan"), "ci95": ci,
            "runs_per_task": [int(len(s)) for s in runs], "method": "stratified BCa"}


def _prob_greater(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """P(X > Y) + P(X = Y) / 2 over all pairs of x's and y's runs (the Mann-Whitney U over
    nx * ny), along the last axis (resamples in front)."""
    d = x[..., :, None] - y[..., None, :]
    return ((d > 0).mean(axis=(-2, -1)) + 0.5 * (d == 0).mean(axis=(-2, -1)))


def probability_of_improvement(x_per_task: Sequence[Sequence[float]],
                               y_per_task: Sequence[Sequence[float]], level: float = 0.95,
                               seed: int = 0) -> dict:
    """rliable's probability of improvement of X over Y: per task, the chance that a run of
    X scores above a run of Y (ties count half), averaged over tasks; a stratified BCa
    interval over both variants' runs. 0.5: no difference; an interval above 0.5 says X
    beats Y in the runs' ordering, whatever the scale."""
    xs = [np.asarray(t, dtype=float) for t in x_per_task]
    ys = [np.asarray(t, dtype=float) for t in y_per_task]
    k = len(xs)
    if not k:
        return {"p": float("nan"), "ci95": NAN2, "tasks": 0}
    p = float(np.mean([_prob_greater(a, b) for a, b in zip(xs, ys)]))

    def statistic(*samples, axis=-1):
        return np.mean([_prob_greater(samples[i], samples[k + i]) for i in range(k)], axis=0)

    return {"p": p, "ci95": _bca(xs + ys, statistic, level, seed), "tasks": k,
            "method": "stratified BCa"}
