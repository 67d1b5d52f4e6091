import numpy as np
import pytest

from rlhf_ray.core.segments import (
    SegmentBatch,
    cut_segments,
    default_segment_length,
    segment_starts,
)


def episode(t, obs_dim=3):
    return {"obs": np.arange(t * obs_dim, dtype=np.float32).reshape(t, obs_dim),
            "actions": np.arange(t, dtype=np.float32).reshape(t, 1),
            "true_rewards": np.arange(t, dtype=np.float32),
            "state_qpos": np.arange(t, dtype=np.float64).reshape(t, 1) * 10}


def test_segments_are_contiguous_windows_of_one_episode():
    b = cut_segments(episode(100), 10, 5, np.random.default_rng(0), env_steps=42)
    assert len(b) == 5 and b.length == 10
    for i in range(5):
        r = b.arrays["true_rewards"][i]
        assert np.array_equal(r, np.arange(r[0], r[0] + 10))  # consecutive steps
        # every field is cut at the same steps (state kept per step for rendering)
        assert np.array_equal(b.arrays["state_qpos"][i, :, 0], r * 10)
        assert np.array_equal(b.arrays["actions"][i, :, 0], r)
    assert (b.env_steps == 42).all()
    assert len(set(b.ids)) == 5


def test_segments_do_not_overlap():
    starts = segment_starts(100, 10, 10, np.random.default_rng(3))
    assert len(starts) == 10
    assert (np.diff(np.sort(starts)) >= 10).all()
    assert starts.max() + 10 <= 100


def test_short_episode_gives_no_segment():
    assert cut_segments(episode(9), 10, 3, np.random.default_rng(0)) is None


def test_mismatched_lengths_are_refused():
    ep = episode(20)
    ep["actions"] = ep["actions"][:-1]
    with pytest.raises(ValueError, match="actions"):
        cut_segments(ep, 5, 2, np.random.default_rng(0))


def test_concat_and_take():
    rng = np.random.default_rng(0)
    a = cut_segments(episode(50), 10, 2, rng)
    b = cut_segments(episode(50), 10, 3, rng)
    c = SegmentBatch.concat([a, b])
    assert len(c) == 5 and c.ids[:2] == a.ids
    assert c.take([4]).ids == [b.ids[2]]
    assert c.true_returns().shape == (5,)


def test_default_length_is_about_one_and_a_half_seconds():
    assert default_segment_length(0.05) == 30  # HalfCheetah
    assert default_segment_length(0.008) == 188  # Hopper at its native dt
    assert default_segment_length(0.05, atari=True) == 25
