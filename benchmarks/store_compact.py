"""Reading a preference store back: thousands of one-label parts vs the same store compacted.

The labeler writes one durable part per answer (50 labelers for 60 s left ~2,900). This
writes `--labels` single-label parts (and their segments, a part per 32), times a cold
`labels()` + `segments()` read, compacts, times the same read again, checks that every row
came back, and prints the ratio; side by side in one run.

    python benchmarks/store_compact.py --labels 3000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="JSON file for the record")
    args = ap.parse_args()

    from rlhf_ray.core.segments import cut_segments
    from rlhf_ray.storage.store import Label, PreferenceStore

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = PreferenceStore(str(Path(tmp) / "preferences"))
        ids: list[str] = []
        while len(ids) < 2 * args.labels:  # Hopper-sized segments: 50 steps of 11 + 3 floats
            ep = {"obs": rng.normal(size=(1600, 11)).astype(np.float32),
                  "actions": rng.normal(size=(1600, 3)).astype(np.float32),
                  "true_rewards": rng.normal(size=1600).astype(np.float32),
                  "state_qpos": rng.normal(size=(1600, 6)), "state_qvel": rng.normal(size=(1600, 6))}
            batch = cut_segments(ep, 50, 32, rng)
            store.write_segments(batch)
            ids += batch.ids
        t = time.time()
        for i in range(args.labels):  # one durable part per answer, as the labeling app writes
            store.append_labels([Label(f"q{i}", ids[2 * i], ids[2 * i + 1], "left", "oracle", t, t, 1)])

        def read() -> tuple[float, int, int]:
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fresh = PreferenceStore(store.root)  # a reopening, as a restarted labeler does
                labels = fresh.labels()
                segs = fresh.segments(labels.column("left_id").to_pylist()
                                      + labels.column("right_id").to_pylist())
                best = min(best, time.perf_counter() - t0)
            return best, len(labels), len(segs)

        before_s, n_before, s_before = read()
        parts_before = {sub: len(store._parts(sub)) for sub in ("labels", "segments")}
        t0 = time.perf_counter()
        store.compact(min_age_s=0)
        compact_s = time.perf_counter() - t0
        after_s, n_after, s_after = read()
        parts_after = {sub: len(store._parts(sub)) for sub in ("labels", "segments")}
    assert (n_before, s_before) == (n_after, s_after) == (args.labels, 2 * args.labels)
    record = {"labels": args.labels, "parts_before": parts_before, "parts_after": parts_after,
              "read_s_before": before_s, "read_s_after": after_s, "compact_s": compact_s,
              "speedup": before_s / after_s}
    print(f"{args.labels} labels: read back {before_s:.2f} s from {parts_before} parts, "
          f"{after_s:.3f} s from {parts_after} after compaction ({compact_s:.1f} s): "
          f"{before_s / after_s:.1f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
