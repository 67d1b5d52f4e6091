"""Statistics for results over seeds (Agarwal et al. 2021, "Deep RL at the edge of the
statistical precipice"): percentile-bootstrap intervals, the interquartile mean (IQM) and its
stratified bootstrap over tasks.

The computations are rliable's (`metrics.aggregate_iqm`, `library.get_interval_estimates`
with its stratified bootstrap), done with scipy: rliable 1.2.0 needs `arch < 8`, which fails to
import under pandas 3 (this project's dependency set), and arch 8 drops the argument rliable
passes. IQM is the 25% trimmed mean (scipy.stats.trim_mean); the stratified bootstrap
resamples the runs of each task independently (scipy.stats.bootstrap, paired=False, one
sample per task).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy import stats

REPS = 10_000


def iqm(x: Sequence[float]) -> float:
    """Interquartile mean: the mean of the middle 50% of the values."""
    return float(stats.trim_mean(np.asarray(x, dtype=float), 0.25))


def _interval(samples: list[np.ndarray], statistic: Callable, level: float,
              seed: int) -> tuple[float, float]:
    if any(len(s) < 2 for s in samples):  # one run: no spread to resample
        return float("nan"), float("nan")
    if all(np.ptp(s) == 0 for s in samples):  # every resample gives the same value
        v = float(statistic(*samples, axis=-1))
        return v, v
    res = stats.bootstrap(samples, statistic, n_resamples=REPS, paired=False,
                          vectorized=True, confidence_level=level, method="percentile",
                          rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def mean_ci(x: Sequence[float], level: float = 0.95, seed: int = 0) -> dict:
    """Mean of the runs with a percentile-bootstrap interval."""
    x = np.asarray(x, dtype=float)
    lo, hi = _interval([x], lambda a, axis: a.mean(axis=axis), level, seed)
    return {"mean": float(x.mean()) if len(x) else float("nan"), "ci95": [lo, hi],
            "n": int(len(x))}


def ratio_ci(x: Sequence[float], y: Sequence[float], level: float = 0.95, seed: int = 0,
             floor: float = 0.0) -> dict:
    """(mean(x) - floor) / (mean(y) - floor) with a percentile-bootstrap interval, x's and
    y's runs resampled independently (two variants' seeds are not paired). `floor`: the
    score that counts as nothing (a random policy's return), so a ratio means the same on
    tasks whose returns are negative (Reacher, HalfCheetah's random policy, Pong): 1 is y's
    score, 0 the floor's."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if not len(x) or not len(y) or y.mean() == floor:
        return {"ratio": float("nan"), "ci95": [float("nan")] * 2, "n": [len(x), len(y)],
                "floor": floor}
    ratio = float((x.mean() - floor) / (y.mean() - floor))
    with np.errstate(divide="ignore", invalid="ignore"):  # resamples whose y mean is the floor
        lo, hi = _interval([x, y], lambda a, b, axis: (a.mean(axis=axis) - floor)
                           / (b.mean(axis=axis) - floor), level, seed)
    return {"ratio": ratio, "ci95": [lo, hi], "n": [int(len(x)), int(len(y))], "floor": floor}


def _pooled_iqm(*samples, axis=-1):
    return stats.trim_mean(np.concatenate(samples, axis=axis), 0.25, axis=axis)


def iqm_ci(per_task: Sequence[Sequence[float]], level: float = 0.95, seed: int = 0) -> dict:
    """IQM over all runs of all tasks (scores already normalized per task) with a stratified
    bootstrap interval: each task's runs are resampled on their own, as rliable does."""
    samples = [np.asarray(t, dtype=float) for t in per_task]
    pooled = np.concatenate(samples) if samples else np.zeros(0)
    lo, hi = _interval(samples, _pooled_iqm, level, seed)
    return {"iqm": iqm(pooled) if len(pooled) else float("nan"), "ci95": [lo, hi],
            "runs_per_task": [int(len(s)) for s in samples]}
