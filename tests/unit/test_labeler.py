import numpy as np
import pytest

from rlhf_ray.core.segments import cut_segments
from rlhf_ray.feedback.labeler import Labeler
from rlhf_ray.feedback.queries import ClipPairs, TextRankings
from rlhf_ray.storage.store import PreferenceStore


def pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    t = 20 * n
    ep = {"obs": rng.normal(size=(t, 3)).astype(np.float32),
          "actions": rng.normal(size=(t, 1)).astype(np.float32),
          "true_rewards": rng.normal(size=t).astype(np.float32)}
    b = cut_segments(ep, 10, 2 * n, rng)
    return b.take(range(n)), b.take(range(n, 2 * n))


def test_oracle_labels_are_durable_and_drained(tmp_path):
    lab = Labeler(str(tmp_path), ClipPairs(), source="oracle", seed=0)
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
    lab = Labeler(str(tmp_path), ClipPairs(), source="human", seed=0)
    q = lab.submit(*pairs(2))
    assert lab.stats()["labels_pending"] == 2
    assert lab.answer(q[0], "right", "human:ann") == "stored"
    assert lab.answer(q[0], "right", "human:ann") == "duplicate"
    assert lab.answer(q[0], "left", "human:bob") == "conflict"
    assert lab.answer("nope", "left", "human:ann") == "unknown"
    assert PreferenceStore(str(tmp_path)).count() == 1
    # a restarted labeler knows every acknowledged answer
    again = Labeler(str(tmp_path), ClipPairs(), source="human")
    assert again.stats()["labels_by_source"] == {"human:ann": 1}
    assert again.answer(q[0], "right", "human:ann") == "duplicate"


def test_leases_hold_a_query_for_one_labeler_until_expiry(tmp_path):
    lab = Labeler(str(tmp_path), ClipPairs(), source="human", seed=0, lease_s=10.0)
    q = lab.submit(*pairs(2))
    assert lab.lease_next("ann", now=0.0) is None  # clips not rendered yet: nothing offered
    assert [qid for qid, _ in lab.to_render(4, now=0.0)] == q
    assert lab.to_render(4, now=1.0) == []  # handed out once per retry period
    lab.mark_ready(q)
    a = lab.lease_next("ann", now=0.0)
    b = lab.lease_next("bob", now=0.0)
    assert a["query_id"] == q[0] and b["query_id"] == q[1]
    assert lab.lease_next("cy", now=5.0) is None  # both held
    assert lab.lease_next("ann", now=5.0)["query_id"] == q[0]  # a holder gets its own back
    assert lab.lease_next("ann", exclude=[q[0]], now=5.0) is None
    assert lab.lease_next("cy", now=16.0)["query_id"] == q[0]  # ann's lease ran out
    assert lab.stats(now=16.0)["labels_leased"] == 1  # cy holds q0; bob's lease on q1 ran out


def test_ranking_is_stored_as_all_pairs_with_one_ranking_id(tmp_path):
    lab = Labeler(str(tmp_path), TextRankings(), source="human", seed=0)
    qid, cmp_id = lab.submit(["p", "q"], [["a", "b", "c", "d"], ["x", "y"]])
    with pytest.raises(ValueError, match="each of the 4"):
        lab.answer(qid, [0, 0, 1, 2], "human:ann")
    with pytest.raises(ValueError, match="takes an order"):
        lab.answer(qid, "left", "human:ann")
    assert lab.answer(qid, [2, 0, 3, 1], "human:ann") == "stored"
    assert lab.answer(qid, [2, 0, 3, 1], "human:ann") == "duplicate"
    assert lab.answer(qid, [0, 1, 2, 3], "human:ann") == "conflict"
    rows = PreferenceStore(str(tmp_path)).labels().to_pylist()
    assert len(rows) == 6 and {r["ranking_id"] for r in rows} == {qid}
    pairs_ = lab.drain()
    better = {(d["left"], d["right"]): d["mu"] for d in pairs_}
    # c > a > d > b
    assert better[("a", "b")] == 1.0 and better[("a", "c")] == 0.0 and better[("c", "d")] == 1.0
    assert better[("b", "d")] == 0.0 and len(pairs_) == 6
    # reopening restores the ranking (as answered) and the comparison (as pending)
    again = Labeler(str(tmp_path), TextRankings(), source="human")
    assert again.answer(qid, [2, 0, 3, 1], "human:ann") == "duplicate"
    assert again.answer(qid, [3, 0, 2, 1], "human:ann") == "conflict"
    nxt = again.lease_next("bob")
    assert nxt["query_id"] == cmp_id and nxt["kind"] == "text" and nxt["responses"] == ["x", "y"]
    assert again.answer(cmp_id, "right", "human:bob") == "stored"
    assert again.stats()["labels_by_source"] == {"human:ann": 1, "human:bob": 1}


def test_pending_clip_queries_survive_a_restart(tmp_path):
    lab = Labeler(str(tmp_path), ClipPairs(), source="human", seed=0)
    left, right = pairs(3)
    q = lab.submit(left, right)
    lab.answer(q[1], "left", "human:ann")
    again = Labeler(str(tmp_path), ClipPairs(), source="human")
    assert set(again.pending) == {q[0], q[2]}
    assert np.array_equal(again.pending[q[2]].payload.arrays["obs"][0], left.arrays["obs"][2])
    assert again.answer(q[1], "left", "human:ann") == "duplicate"


def test_mixed_mode_oracle_answers_only_overdue_queries(tmp_path):
    lab = Labeler(str(tmp_path), ClipPairs(), source="mixed", seed=0, deadline_s=30.0)
    q = lab.submit(*pairs(3))
    t = lab.pending[q[0]].created_at
    lab.mark_ready(q)
    lab.lease_next("ann", now=t + 31)  # q0 leased: its holder may still answer
    assert lab.expire_overdue(now=t + 10) == 0
    assert lab.expire_overdue(now=t + 31) == 2
    assert lab.answer(q[0], "equal", "human:ann") == "stored"
    assert lab.stats()["labels_by_source"] == {"oracle": 2, "human:ann": 1}
    assert Labeler(str(tmp_path), ClipPairs(), source="human").stats()["labels_pending"] == 0


def test_text_oracle_by_import_path(tmp_path):
    # operator.contains(prompt, response): 1.0 when the response occurs in the prompt
    lab = Labeler(str(tmp_path), TextRankings(oracle="operator:contains"), source="oracle", seed=0)
    lab.submit(["abc", "aa b"], [["a", "x"], ["z", "aa", "b"]])
    rows = PreferenceStore(str(tmp_path)).labels().to_pylist()
    assert [r["label"] for r in rows if not r["ranking_id"]] == ["left"]
    assert sorted(r["label"] for r in rows if r["ranking_id"]) == ["left", "right", "right"]
    with pytest.raises(ValueError, match="module:function"):
        Labeler(str(tmp_path / "x"), TextRankings(oracle="nocolon"))


def test_reopened_store_gives_back_text_comparisons(tmp_path):
    """The LLM reward model can start from the labels a store already holds (a reopened run,
    or rankings given with `rlhf-ray label`): every pair of every ranking, with its prompt."""
    from rlhf_ray.feedback.labeler import Labeler

    lab = Labeler(str(tmp_path / "prefs"), TextRankings(), source="human")
    q1, q2 = lab.submit(["p1", "p2"], [["a", "b"], ["x", "y", "z"]])
    assert lab.answer(q1, "right", "human:ann") == "stored"
    assert lab.answer(q2, [2, 0, 1], "human:ann") == "stored"
    again = Labeler(str(tmp_path / "prefs"), TextRankings(), source="human").stored()
    again = next(again)
    pairs = sorted((c["prompt"], c["left"], c["right"], c["mu"]) for c in again)
    assert pairs == [("p1", "a", "b", 0.0), ("p2", "x", "y", 1.0), ("p2", "x", "z", 0.0),
                     ("p2", "y", "z", 0.0)]
    assert len({c["ranking_id"] for c in again}) == 2


def test_a_restarted_labeler_never_reuses_query_ids(tmp_path):
    """Same seed, same store, restarted: new queries get new ids, so reopening the store
    (which deduplicates by id) keeps every label."""
    from rlhf_ray.feedback.labeler import Labeler

    root = str(tmp_path / "prefs")
    a = Labeler(root, TextRankings(oracle="rlhf_ray.llm.tiny:sentiment_oracle"), source="oracle", seed=3)
    first = a.submit(["write about the fox :"], [["good fox", "bad", "fox"]])
    b = Labeler(root, TextRankings(oracle="rlhf_ray.llm.tiny:sentiment_oracle"), source="oracle", seed=3)
    second = b.submit(["write about the fox :"], [["good fox", "bad", "fox"]])
    assert set(first).isdisjoint(second)
    again = Labeler(root, TextRankings(), source="oracle", seed=3)
    assert again.stats()["labels_total"] == 2
    assert len(PreferenceStore(root).labels()) == 2 * 3  # two rankings of 3: 3 pairs each
