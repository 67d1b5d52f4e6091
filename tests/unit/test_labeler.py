import numpy as np

from rlhf_ray.core.segments import cut_segments
from rlhf_ray.labeler import Labeler
from rlhf_ray.store import PreferenceStore


def pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    t = 20 * n
    ep = {"obs": rng.normal(size=(t, 3)).astype(np.float32),
          "actions": rng.normal(size=(t, 1)).astype(np.float32),
          "true_rewards": rng.normal(size=t).astype(np.float32)}
    b = cut_segments(ep, 10, 2 * n, rng)
    return b.take(range(n)), b.take(range(n, 2 * n))


def test_oracle_labels_are_durable_and_drained(tmp_path):
    lab = Labeler(str(tmp_path), source="oracle", seed=0)
    left, right = pairs(6)
    ids = lab.submit(left, right, rm_version=2)
    assert len(ids) == 6 and lab.stats()["labels_total"] == 6
    rows = PreferenceStore(str(tmp_path)).labels().to_pylist()
    want = ["left" if a > b else "right" for a, b in zip(left.true_returns(), right.true_returns())]
    assert [r["label"] for r in rows] == want
    assert all(r["rm_version"] == 2 and r["source"] == "oracle" for r in rows)
    comp = lab.drain()
    assert len(comp) == 6 and np.array_equal(comp.left_obs, left.arrays["obs"])
    assert lab.drain() is None  # drained once
    # the segments each label cites are in the store
    assert PreferenceStore(str(tmp_path)).segments([rows[0]["left_id"]]).ids == [rows[0]["left_id"]]


def test_human_answers_are_idempotent_and_conflicts_refused(tmp_path):
    lab = Labeler(str(tmp_path), source="human", seed=0)
    q = lab.submit(*pairs(2))
    assert lab.stats()["labels_pending"] == 2
    assert lab.answer(q[0], "right", "human:ann") == "stored"
    assert lab.answer(q[0], "right", "human:ann") == "duplicate"
    assert lab.answer(q[0], "left", "human:bob") == "conflict"
    assert lab.answer("nope", "left", "human:ann") == "unknown"
    assert PreferenceStore(str(tmp_path)).count() == 1
    # a restarted labeler knows every acknowledged answer
    again = Labeler(str(tmp_path), source="human")
    assert again.stats()["labels_by_source"] == {"human:ann": 1}
    assert again.answer(q[0], "right", "human:ann") == "duplicate"
