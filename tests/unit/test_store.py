import os

import numpy as np
import pytest

from rlhf_ray.core.segments import cut_segments
from rlhf_ray.errors import StoreError
from rlhf_ray.storage.store import Label, PreferenceStore


def segs(n=4, k=5, seed=0):
    rng = np.random.default_rng(seed)
    t = 200
    ep = {"obs": rng.normal(size=(t, 3)).astype(np.float32),
          "actions": rng.normal(size=(t, 2)).astype(np.float32),
          "true_rewards": rng.normal(size=t).astype(np.float32),
          "state_qpos": rng.normal(size=(t, 4))}
    return cut_segments(ep, k, n, rng)


def label(q, left, right, choice="left", source="oracle"):
    return Label(q, left, right, choice, source, 1.0, 2.0, 3)


def test_round_trip(tmp_path):
    store = PreferenceStore(str(tmp_path / "prefs"))
    b = segs()
    store.write_segments(b)
    store.append_labels([label("q1", b.ids[0], b.ids[1]), label("q2", b.ids[2], b.ids[3], "skip")])
    again = PreferenceStore(str(tmp_path / "prefs"))  # reopen
    rows = again.labels().to_pylist()
    assert [(r["query_id"], r["label"], r["mu"]) for r in rows] == [("q1", "left", 1.0), ("q2", "skip", None)]
    assert rows[0]["rm_version"] == 3 and rows[0]["source"] == "oracle"
    got = again.segments([b.ids[3], b.ids[0]])
    assert got.ids == [b.ids[3], b.ids[0]]
    for name in b.arrays:
        assert np.array_equal(got.arrays[name][1], b.arrays[name][0])
        assert got.arrays[name].dtype == b.arrays[name].dtype


def test_file_uri_goes_through_pyarrow_fs(tmp_path):
    store = PreferenceStore(f"file://{tmp_path}/p")
    b = segs()
    store.write_segments(b)
    store.append_labels([label("q", b.ids[0], b.ids[1])])
    assert PreferenceStore(f"file://{tmp_path}/p").count() == 1
    assert os.listdir(tmp_path / "p" / "labels")


def test_crash_before_rename_leaves_nothing_half_read(tmp_path):
    store = PreferenceStore(str(tmp_path))
    b = segs()
    store.write_segments(b)
    store.append_labels([label("q1", b.ids[0], b.ids[1])])
    # a writer killed mid-write leaves a hidden temp file with garbage in it
    (tmp_path / "labels" / ".tmp-part-99.parquet").write_bytes(b"PAR1 half a file")
    assert PreferenceStore(str(tmp_path)).count() == 1


def test_crash_after_write_before_ack_then_retry_is_stored_once(tmp_path):
    store = PreferenceStore(str(tmp_path))
    b = segs()
    store.write_segments(b)
    store.append_labels([label("q1", b.ids[0], b.ids[1])])  # durable, but the ack never arrived
    store.append_labels([label("q1", b.ids[0], b.ids[1])])  # the client retries
    rows = PreferenceStore(str(tmp_path)).labels().to_pylist()
    assert [r["query_id"] for r in rows] == ["q1"]


def test_corrupt_part_is_named(tmp_path):
    store = PreferenceStore(str(tmp_path))
    bad = tmp_path / "labels" / "part-00000000000000000001-bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(StoreError, match="part-00000000000000000001-bad.parquet"):
        store.labels()
    assert bad.read_bytes() == b"not parquet at all"  # nothing overwritten


def test_missing_segment_is_reported(tmp_path):
    store = PreferenceStore(str(tmp_path))
    store.write_segments(segs())
    with pytest.raises(StoreError, match="missing"):
        store.segments(["nope"])


def test_bad_label_refused():
    with pytest.raises(ValueError, match="must be one of"):
        label("q", "a", "b", "maybe").row()


def run_with_a_part_cut_short(tmp_path):
    """A run folder whose store holds labels q1, q2 and a copy of q2's part cut short."""
    run = tmp_path / "run"
    store = PreferenceStore(str(run / "preferences"))
    b = segs()
    store.write_segments(b)
    store.append_labels([label("q1", b.ids[0], b.ids[1])])
    good = store.append_labels([label("q2", b.ids[2], b.ids[3])])
    truncated = run / "preferences" / "labels" / "part-00000000000000000002-cut.parquet"
    truncated.write_bytes(open(good, "rb").read()[:40])
    return run, good, truncated


def test_store_check_reports_and_quarantines_what_cannot_be_read(tmp_path, capsys):
    from rlhf_ray.cli import main

    run, good, truncated = run_with_a_part_cut_short(tmp_path)
    tmp = run / "preferences" / "labels" / ".tmp-part-3.parquet"
    tmp.write_bytes(b"PAR1 half")  # a write the crash interrupted
    with pytest.raises(StoreError, match="part-00000000000000000002-cut.parquet"):
        PreferenceStore(str(run / "preferences")).labels()
    assert main(["store", "check", str(run)]) == 1
    out = capsys.readouterr().out
    assert "unreadable" in out and truncated.name in out and tmp.name in out
    assert truncated.read_bytes() == open(good, "rb").read()[:40]  # nothing touched
    assert main(["store", "check", str(run), "--quarantine"]) == 0
    assert not truncated.exists() and not tmp.exists()
    kept = run / "preferences" / "quarantine" / "labels" / truncated.name
    assert kept.read_bytes() == open(good, "rb").read()[:40]  # moved aside, not deleted
    rows = PreferenceStore(str(run / "preferences")).labels()
    assert sorted(rows.column("query_id").to_pylist()) == ["q1", "q2"]
    assert main(["store", "check", str(run)]) == 0


def _snapshot(store, *id_groups):
    arrays, steps = {}, []
    for g, ids in enumerate(id_groups):  # one group per array layout
        got = store.segments(ids)
        arrays.update({(g, n): a.copy() for n, a in got.arrays.items()})
        steps += got.env_steps.tolist()
    return store.labels().to_pylist(), store.queries().to_pylist(), arrays, steps


def test_compact_merges_parts_and_keeps_every_row(tmp_path, capsys):
    from rlhf_ray.cli import main
    from rlhf_ray.storage.store import QueryRecord

    run = tmp_path / "run"
    store = PreferenceStore(str(run / "preferences"))
    a, b = segs(seed=0), segs(seed=1)
    store.write_segments(a)
    store.write_segments(b)
    other = segs(seed=2)
    del other.arrays["state_qpos"]  # another array layout (e.g. Atari beside MuJoCo)
    store.write_segments(other)
    ids = a.ids + b.ids + other.ids
    for i in range(6):
        store.write_queries([QueryRecord(f"q{i}", "clip", [ids[i], ids[i + 1]], 1.0, 0)])
        store.append_labels([label(f"q{i}", ids[i], ids[i + 1], ["left", "right", "equal"][i % 3])])
    # a retry after a crash before the acknowledgement: the first write must keep winning
    store.append_labels([label("q0", ids[0], ids[1], "right")])
    before = _snapshot(store, a.ids + b.ids, other.ids)
    assert main(["store", "compact", str(run), "--min-age-s", "0"]) == 0
    assert "labels 7 -> 1 parts" in capsys.readouterr().out
    files = {sub: sorted(os.listdir(run / "preferences" / sub)) for sub in ("labels", "queries", "segments")}
    assert len(files["labels"]) == 1 and len(files["queries"]) == 1
    assert len(files["segments"]) == 2  # one merged part per array layout
    again = PreferenceStore(str(run / "preferences"))
    after = _snapshot(again, a.ids + b.ids, other.ids)
    assert after[0] == before[0] and after[1] == before[1] and after[3] == before[3]
    assert [r["label"] for r in after[0]][:1] == ["left"]
    for name in before[2]:
        assert np.array_equal(after[2][name], before[2][name])
    assert len(again.labels()) == 6
    # a part written after the compaction sorts after the merged one and is read as usual
    again.append_labels([label("q9", ids[0], ids[2])])
    assert again.labels().column("query_id").to_pylist()[-1] == "q9"
    assert again.compact(("labels",), min_age_s=0) == {"labels": (2, 1)}
    assert again.compact(("labels",), min_age_s=0) == {"labels": (1, 1)}  # nothing to do


def three_label_parts(root):
    """A store with labels q0, q1, q2, each in its own part."""
    store = PreferenceStore(str(root))
    b = segs()
    store.write_segments(b)
    for i in range(3):
        store.append_labels([label(f"q{i}", b.ids[i], b.ids[i + 1])])
    return store


def test_compact_interrupted_before_deleting_loses_and_doubles_nothing(tmp_path):
    store = three_label_parts(tmp_path / "prefs")
    before = store.labels().to_pylist()

    class KilledBeforeDeleting:  # the process dies once the merged part is durable
        def __init__(self, fs):
            self.fs = fs

        def __getattr__(self, name):
            return getattr(self.fs, name)

        def delete_file(self, path):
            raise OSError("killed mid-compaction")

    real = store.fs
    store.fs = KilledBeforeDeleting(real)
    with pytest.raises(OSError, match="killed"):
        store.compact(("labels",), min_age_s=0)
    store.fs = real
    assert len(os.listdir(tmp_path / "prefs" / "labels")) == 4  # merged part + the 3 old ones
    assert PreferenceStore(str(tmp_path / "prefs")).labels().to_pylist() == before
    assert store.compact(("labels",), min_age_s=0) == {"labels": (4, 1)}  # compacting again finishes it
    assert PreferenceStore(str(tmp_path / "prefs")).labels().to_pylist() == before


def test_compact_stops_at_an_unreadable_part_before_changing_anything(tmp_path, capsys):
    from rlhf_ray.cli import main

    run, _, bad = run_with_a_part_cut_short(tmp_path)
    listing = sorted(os.listdir(run / "preferences" / "labels"))
    assert main(["store", "compact", str(run), "--min-age-s", "0"]) == 1
    err = capsys.readouterr().err
    assert bad.name in err and "store check" in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(run / "preferences" / "labels")) == listing


def test_a_reader_lists_again_when_a_compaction_removed_parts_under_it(tmp_path):
    store = three_label_parts(tmp_path / "prefs")
    reader = PreferenceStore(str(tmp_path / "prefs"))
    real_parts, calls = reader._parts, []

    def stale_then_fresh(sub):
        calls.append(sub)
        listed = real_parts(sub)
        if len(calls) == 1:  # the listing is taken, then a compaction runs
            PreferenceStore(str(tmp_path / "prefs")).compact(("labels",), min_age_s=0)
        return listed

    reader._parts = stale_then_fresh
    assert reader.labels().column("query_id").to_pylist() == ["q0", "q1", "q2"]
    assert len(calls) == 2


def test_compact_leaves_parts_that_may_still_be_landing(tmp_path):
    """A part's name is taken when its write starts: one named just before the compaction
    listed the folder may land after it, and must still sort after the merged part (else a
    retried label would overtake the original). Young parts are therefore left alone."""
    store = PreferenceStore(str(tmp_path / "prefs"))
    b = segs()
    store.write_segments(b)
    labels_dir = tmp_path / "prefs" / "labels"
    for i in range(3):  # three parts written long ago
        path = store.append_labels([label(f"q{i}", b.ids[i], b.ids[i + 1], "left")])
        os.rename(path, labels_dir / f"part-{1_000_000 + i:020d}-old{i}.parquet")
    # a retry of q0 whose write started before the compaction and landed during it
    store.append_labels([label("q0", b.ids[0], b.ids[1], "right")])
    assert store.compact(("labels",)) == {"labels": (3, 1)}  # default: parts over 60 s old
    assert len(os.listdir(labels_dir)) == 2
    rows = PreferenceStore(str(tmp_path / "prefs")).labels().to_pylist()
    assert [(r["query_id"], r["label"]) for r in rows] == [("q0", "left"), ("q1", "left"), ("q2", "left")]
    assert store.compact(("labels",)) == {"labels": (1, 1)}  # the young one waits its turn
