import numpy as np
import pytest

from rlhf_ray.core.query_selection import (
    candidate_pairs,
    preference_variance,
    select_queries,
)


def test_candidate_pairs_are_distinct_and_in_range():
    rng = np.random.default_rng(0)
    pairs = candidate_pairs(5, 1000, rng)
    assert pairs.shape == (1000, 2)
    assert (pairs[:, 0] != pairs[:, 1]).all()
    assert pairs.min() >= 0 and pairs.max() < 5


def test_picks_the_max_variance_pairs():
    # 3 members agree on segments 0..5 except segment 6 and 7, where they disagree sharply
    returns = np.zeros((3, 8))
    returns[:, 6] = [10.0, -10.0, 0.0]
    returns[:, 7] = [-10.0, 10.0, 0.0]
    rng = np.random.default_rng(1)
    picked = select_queries(returns, num_queries=1, oversampling=200, rng=rng)
    assert set(picked[0].tolist()) == {6, 7}
    # the chosen pair's variance is the max over all candidates
    all_pairs = np.array([(i, j) for i in range(8) for j in range(8) if i != j])
    assert preference_variance(returns, picked).max() == pytest.approx(
        preference_variance(returns, all_pairs).max())


def test_variance_is_zero_when_members_agree():
    returns = np.tile(np.arange(6.0), (4, 1))
    assert np.allclose(preference_variance(returns, np.array([[0, 5], [2, 3]])), 0)


def test_uniform_selection_ignores_predictions():
    returns = np.zeros((3, 10))
    returns[:, 0] = [5, -5, 0]
    rng = np.random.default_rng(0)
    picked = select_queries(returns, 50, 10, rng, method="uniform")
    assert picked.shape == (50, 2)
    assert len(np.unique(picked)) > 5  # not concentrated on the disagreeing segment


def test_errors():
    with pytest.raises(ValueError, match="at least 2 segments"):
        candidate_pairs(1, 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown query selection"):
        select_queries(np.zeros((2, 4)), 1, 2, np.random.default_rng(0), method="max")
