"""Intervals over seeds: known values, their coverage at 5 seeds (and the percentile
bootstrap's, which they replace), rliable's IQM and probability of improvement."""

import numpy as np
import pytest
from scipy import stats

from rlhf_ray.core.stats import (fieller, iqm, iqm_ci, mean_ci, probability_of_improvement,
                                 ratio_ci)

pytestmark = pytest.mark.unit


def test_iqm_is_the_mean_of_the_middle_half():
    assert iqm([0, 1, 2, 3, 4, 5, 6, 100]) == pytest.approx(np.mean([2, 3, 4, 5]))
    assert iqm([5, 5, 5, 5]) == 5.0


def test_mean_interval_is_students_t_by_hand():
    x = [1.0, 2.0, 3.0, 4.0, 5.0]  # mean 3, sd sqrt(2.5), t(0.975, 4) = 2.776445
    r = mean_ci(x)
    half = 2.7764451051977987 * np.sqrt(2.5) / np.sqrt(5)
    assert r["ci95"] == pytest.approx([3 - half, 3 + half]) and r["method"] == "t"
    assert np.isnan(mean_ci([4.0])["ci95"][0]) and mean_ci([4.0])["mean"] == 4.0


def test_fieller_by_hand_and_unbounded_when_the_denominator_reaches_the_floor():
    x, y = np.array([9.0, 10.0, 11.0]), np.array([19.0, 20.0, 21.0])
    lo, hi, bounded = fieller(x, y)
    # the bounds are the ratios at which mean(x) - r mean(y) sits at the edge of its t
    # interval (Welch's df at the estimate r = 0.5)
    vx, vy = x.var(ddof=1) / 3, y.var(ddof=1) / 3
    df = (vx + 0.25 * vy) ** 2 / (vx ** 2 / 2 + (0.25 * vy) ** 2 / 2)
    for r in (lo, hi):
        se = np.sqrt(vx + r * r * vy)
        assert abs(10 - r * 20) / se == pytest.approx(stats.t.ppf(0.975, df))
    assert bounded and lo < 0.5 < hi
    lo, hi, bounded = fieller([1.0, 2.0, 3.0], [-1.0, 0.5, 1.0])  # denominator about 0
    assert not bounded and np.isnan(lo)
    r = ratio_ci([1.0, 2.0, 3.0], [-1.0, 0.5, 1.0])
    assert r["bounded"] is False and np.isnan(r["ci95"][0]) and r["ratio"] == pytest.approx(12.0)


def coverage(make_interval, truth, draw, n_sims: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    hits = 0
    for i in range(n_sims):
        lo, hi = make_interval(*draw(rng), i)
        hits += bool(lo <= truth <= hi)
    return hits / n_sims


def test_at_5_seeds_the_intervals_keep_their_coverage_and_the_percentile_bootstrap_does_not():
    """Normal runs, 5 seeds a variant, return ratio 0.8 over a floor of 0 (RLHF mean 800 sd
    150 against a baseline of 1000 sd 120): Fieller's interval covers the true ratio about
    95% of the time, t's the true mean exactly; the percentile bootstrap the project used
    before covers about 85-88% (measured here, with fewer resamples)."""

    def draw(rng):
        return rng.normal(800, 150, 5), rng.normal(1000, 120, 5)

    n = 4000
    fl = coverage(lambda x, y, i: ratio_ci(x, y)["ci95"], 0.8, draw, n)
    t = coverage(lambda x, y, i: mean_ci(x)["ci95"], 800, draw, n)
    assert 0.935 <= fl <= 0.965, fl
    assert 0.935 <= t <= 0.965, t

    def percentile(x, y, i):
        res = stats.bootstrap((x, y), lambda a, b, axis: a.mean(axis) / b.mean(axis),
                              n_resamples=1000, paired=False, vectorized=True,
                              method="percentile", rng=np.random.default_rng(i))
        return res.confidence_interval

    old = coverage(percentile, 0.8, draw, 400)
    assert old < 0.92, old  # the reason for the change


def test_iqm_interval_resamples_each_task_and_its_baseline():
    tasks = [[1.0, 1.1, 0.9, 1.0, 1.05], [0.5, 0.6, 0.4, 0.55, 0.45], [2.0, 2.2, 1.8, 2.1, 1.9]]
    r = iqm_ci(tasks)
    assert r["runs_per_task"] == [5, 5, 5] and r["method"] == "stratified BCa"
    assert r["ci95"][0] <= r["iqm"] <= r["ci95"][1]
    # a constant task adds no spread; one run per task gives no interval
    assert iqm_ci([[1.0, 1.0], [2.0, 2.0]])["ci95"] == [1.5, 1.5]
    assert np.isnan(iqm_ci([[1.0], [2.0]])["ci95"][0])
    # raw scores normalized by a baseline over a floor: the same IQM as normalizing first,
    # and a wider interval, because the baseline's mean is uncertain too
    raw = [[900.0, 950.0, 1000.0, 1050.0, 1100.0], [-3.0, -2.5, -2.0, -3.5, -4.0]]
    base = [[1000.0, 800.0, 1200.0, 900.0, 1100.0], [-5.0, -6.0, -4.0, -5.5, -4.5]]
    floors = [0.0, -10.0]
    pre = [[(v - f) / (np.mean(b) - f) for v in t] for t, b, f in zip(raw, base, floors)]
    fixed, resampled = iqm_ci(pre), iqm_ci(raw, baselines=base, floors=floors)
    assert resampled["iqm"] == pytest.approx(fixed["iqm"])
    assert np.diff(resampled["ci95"])[0] > np.diff(fixed["ci95"])[0]


def test_iqm_interval_covers_at_5_seeds_over_4_tasks():
    """4 tasks x 5 normal runs, each normalized by 5 baseline runs: the stratified BCa
    interval, baseline resampled, covers the true IQM (computed from the distributions)
    at least 90% of the time (measured 0.925 over 600 simulations; a bootstrap, so below t's
    exactness; 0.87 when the baseline's mean is taken as known). 300 simulations here."""
    means, sds = np.array([0.9, 1.1, 1.0, 1.3]), np.array([0.15, 0.25, 0.1, 0.3])
    big = np.random.default_rng(99)
    truth = iqm(np.concatenate([big.normal(m, s, 200_000) for m, s in zip(means, sds)]))

    def draw(rng):
        return ([rng.normal(m, s, 5) for m, s in zip(means, sds)],
                [rng.normal(1.0, 0.1, 5) for _ in means])

    import rlhf_ray.core.stats as st

    reps, st.REPS = st.REPS, 1000
    try:
        cov = coverage(lambda r, b, i: iqm_ci(r, seed=i, baselines=b, floors=[0.0] * 4)["ci95"],
                       truth, draw, 300, seed=3)
    finally:
        st.REPS = reps
    assert cov >= 0.9, cov


def test_probability_of_improvement_by_hand():
    # task 1: x beats y in 3 of 4 pairs; task 2: one tie of 1 pair -> 0.5
    p = probability_of_improvement([[2.0, 4.0], [1.0]], [[1.0, 3.0], [1.0]])
    assert p["p"] == pytest.approx((0.75 + 0.5) / 2) and p["tasks"] == 2
    clear = probability_of_improvement([[10.0, 11.0, 12.0, 13.0, 14.0]] * 2,
                                       [[1.0, 2.0, 3.0, 4.0, 5.0]] * 2)
    assert clear["p"] == 1.0
    rng = np.random.default_rng(0)
    same = probability_of_improvement([rng.normal(0, 1, 5) for _ in range(3)],
                                      [rng.normal(0, 1, 5) for _ in range(3)])
    assert same["ci95"][0] < 0.5 < same["ci95"][1]


def test_ratio_over_a_floor_reads_the_same_on_negative_returns():
    # Reacher-like returns (a random policy near -43, the true reward's PPO near -5): the
    # plain ratio says an agent twice as far from the goal is "2x"; over the random floor it
    # scores below 1, and halfway from random to the true reward's return is 0.5
    worse, base = [-10.0, -9.0, -11.0], [-5.0, -4.5, -5.5]
    assert ratio_ci(worse, base)["ratio"] == pytest.approx(2.0)
    r = ratio_ci(worse, base, floor=-43.0)
    assert r["ratio"] == pytest.approx(33 / 38) and r["floor"] == -43.0
    assert r["ci95"][0] <= r["ratio"] <= r["ci95"][1] < 1.0
    assert ratio_ci([-24.0] * 3, base, floor=-43.0)["ratio"] == pytest.approx(0.5)


def test_ratio_interval_brackets_the_ratio_and_narrows_with_more_seeds():
    rng = np.random.default_rng(0)
    few = ratio_ci(rng.normal(900, 200, 5), rng.normal(1000, 100, 5))
    many = ratio_ci(rng.normal(900, 200, 50), rng.normal(1000, 100, 50))
    for r in (few, many):
        assert r["ci95"][0] < r["ratio"] < r["ci95"][1]
    assert np.diff(many["ci95"])[0] < np.diff(few["ci95"])[0]
    assert many["ci95"][0] < 0.9 < many["ci95"][1]
