"""Query candidates are scored once per reward-model version: the cache behind the variance
rule's returns."""

import numpy as np

from rlhf_ray.control.serve import SegmentReturnsCache
from rlhf_ray.core.segments import SegmentBatch


def _batch(ids):
    n = len(ids)
    obs = np.stack([np.full((5, 3), float(int(i[1:]))) for i in ids])
    return SegmentBatch(ids=list(ids), arrays={"obs": obs, "actions": np.zeros((n, 5, 1)),
                                               "true_rewards": np.zeros((n, 5))})


class Model:  # 2 members; a segment's return is a function of its contents, per version
    def __init__(self):
        self.asked: list[list[str]] = []
        self.version = 1

    def score(self, batch):
        self.asked.append(list(batch.ids))
        base = batch.arrays["obs"].sum(axis=(1, 2))
        return np.stack([base * self.version, -base * self.version])


def test_a_candidate_is_scored_once_per_version_and_the_returns_are_the_models():
    model, cache = Model(), SegmentReturnsCache(max_segments=100)
    first = _batch(["s1", "s2", "s3"])
    np.testing.assert_array_equal(cache.returns(first, 1, model.score), model.score(first))
    model.asked.clear()
    again = _batch(["s3", "s4", "s1"])  # drawn again from the pool, in another order
    np.testing.assert_array_equal(cache.returns(again, 1, model.score), model.score(again))
    assert model.asked[0] == ["s4"]  # only the new segment went to the model
    assert (cache.scored, cache.reused) == (4, 2)
    model.version, model.asked = 2, []  # a new version: every segment is scored again
    np.testing.assert_array_equal(cache.returns(again, 2, model.score), model.score(again))
    assert model.asked[0] == ["s3", "s4", "s1"]


def test_the_cache_keeps_the_newest_segments_only():
    model, cache = Model(), SegmentReturnsCache(max_segments=3)
    cache.returns(_batch(["s1", "s2"]), 1, model.score)
    cache.returns(_batch(["s3", "s4"]), 1, model.score)
    model.asked.clear()
    cache.returns(_batch(["s1", "s4"]), 1, model.score)
    assert model.asked == [["s1"]]  # s1 had been dropped, s4 was kept
