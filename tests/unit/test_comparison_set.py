"""The reward trainer's comparisons, held in the parts they arrived in (no Ray)."""

import numpy as np

from rlhf_ray.core.comparisons import Comparisons, ComparisonSet


def part(rng, n, k=5):
    obs = rng.integers(0, 255, size=(2, n, k, 3, 2), dtype=np.uint8)
    act = rng.integers(0, 6, size=(2, n, k), dtype=np.int64)
    return Comparisons(obs[0], act[0], obs[1], act[1], rng.random(n).astype(np.float32))


def whole(parts):
    return Comparisons(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                         ("left_obs", "left_act", "right_obs", "right_act", "mu")))


def test_rows_gathered_across_parts_equal_the_concatenation():
    rng = np.random.default_rng(0)
    parts = [part(rng, n) for n in (3, 1, 7, 4)]
    s = ComparisonSet()
    for p in parts:
        s.append(p)
    d = whole(parts)
    assert len(s) == 15 and s.segment_len == 5 and s.segment_values == 5 * 3 * 2
    np.testing.assert_array_equal(s.mu, d.mu)
    idx = np.array([14, 0, 3, 3, 9, 2, 11])  # any order, repeats (a bootstrap draws them)
    obs, act, mu = s.pairs(idx)
    np.testing.assert_array_equal(obs, np.concatenate([d.left_obs[idx], d.right_obs[idx]]))
    np.testing.assert_array_equal(act, np.concatenate([d.left_act[idx], d.right_act[idx]]))
    np.testing.assert_array_equal(mu, d.mu[idx])
    # transitions in the order of every left segment's, then every right one's
    all_obs = np.concatenate([d.left_obs, d.right_obs]).reshape(-1, 3, 2)
    all_act = np.concatenate([d.left_act, d.right_act]).reshape(-1)
    o, a = s.transitions()
    np.testing.assert_array_equal(o, all_obs)
    np.testing.assert_array_equal(a, all_act)
    flat = rng.choice(len(all_obs), size=40, replace=False)
    o, a = s.transitions(flat)
    np.testing.assert_array_equal(o, all_obs[flat])
    np.testing.assert_array_equal(a, all_act[flat])


def test_only_whole_parts_before_a_row_are_let_go():
    rng = np.random.default_rng(1)
    parts = [part(rng, n) for n in (3, 4, 5)]
    s = ComparisonSet()
    for p in parts:
        s.append(p)
    assert s.drop_before(2) == 0 and len(s) == 12  # row 2 is inside the first part
    assert s.drop_before(8) == 7 and len(s) == 5   # the first two end at 3 and 7
    obs, _, mu = s.pairs(np.arange(5))
    np.testing.assert_array_equal(obs[:5], parts[2].left_obs)
    np.testing.assert_array_equal(mu, parts[2].mu)
