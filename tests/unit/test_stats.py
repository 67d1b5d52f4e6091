"""Intervals over seeds: known values, coverage, and rliable's IQM on its own example."""

import numpy as np
import pytest

from rlhf_ray.core.stats import iqm, iqm_ci, mean_ci, ratio_ci

pytestmark = pytest.mark.unit


def test_iqm_is_the_mean_of_the_middle_half():
    assert iqm([0, 1, 2, 3, 4, 5, 6, 100]) == pytest.approx(np.mean([2, 3, 4, 5]))
    assert iqm([5, 5, 5, 5]) == 5.0


def test_ratio_interval_brackets_the_ratio_and_narrows_with_more_seeds():
    rng = np.random.default_rng(0)
    few = ratio_ci(rng.normal(900, 200, 5), rng.normal(1000, 100, 5))
    many = ratio_ci(rng.normal(900, 200, 50), rng.normal(1000, 100, 50))
    for r in (few, many):
        assert r["ci95"][0] < r["ratio"] < r["ci95"][1]
    assert np.diff(many["ci95"])[0] < np.diff(few["ci95"])[0]
    assert many["ci95"][0] < 0.9 < many["ci95"][1]


def test_mean_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    hits = sum(lo <= 0 <= hi for lo, hi in
               (mean_ci(rng.normal(0, 1, 20), seed=i)["ci95"] for i in range(100)))
    assert 85 <= hits <= 100  # percentile bootstrap of n = 20 runs a little narrow


def test_iqm_interval_resamples_each_task_on_its_own():
    tasks = [[1.0, 1.1, 0.9, 1.0, 1.05], [0.5, 0.6, 0.4, 0.55, 0.45], [2.0, 2.2, 1.8, 2.1, 1.9]]
    r = iqm_ci(tasks)
    assert r["runs_per_task"] == [5, 5, 5]
    assert r["ci95"][0] <= r["iqm"] <= r["ci95"][1]
    # a constant task adds no spread; one run per task gives no interval
    assert iqm_ci([[1.0, 1.0], [2.0, 2.0]])["ci95"] == [1.5, 1.5]
    assert np.isnan(iqm_ci([[1.0], [2.0]])["ci95"][0])


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
