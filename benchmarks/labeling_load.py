"""50 concurrent scripted labelers for 60 s against the labeling API (a script, not a test).

A real labeler actor and labeling app on Ray Serve (as a run with `labeler.source=human`
starts them), a queue of real Hopper segment pairs marked ready (clip rendering is measured by
benchmarks/labeling.py, not here), and N threads that lease and answer over HTTP as fast as
they can. Prints status counts, latency percentiles, labels/s, and the store check: lost
answers and answers stored twice (both must be 0), and writes JSON.

    python benchmarks/labeling_load.py                        # 50 labelers, 60 s
    python benchmarks/labeling_load.py --labelers 100 --seconds 30
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labelers", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--queries", type=int, default=20000)
    ap.add_argument("--out", default="docs/results/labeling_load.json")
    args = ap.parse_args()
    os.environ.setdefault("MUJOCO_GL", "egl")
    import numpy as np
    import ray

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import hopper_segments

    from rlhf_ray.feedback import app as labeling_app
    from rlhf_ray.feedback.labeler import Labeler
    from rlhf_ray.feedback.load import check_store, run_load
    from rlhf_ray.feedback.queries import ClipPairs
    from rlhf_ray.runtime.serving import ensure_serve_http

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    host, port = ensure_serve_http("127.0.0.1", 8000)
    root = str(Path(tempfile.mkdtemp(prefix="labeling-load-")) / "preferences")
    run = uuid.uuid4().hex[:6]
    name = f"rlhf-labeler-load-{run}"
    ns = ray.get_runtime_context().namespace
    labeler = ray.remote(Labeler).options(name=name, num_cpus=0).remote(
        root, ClipPairs(), source="human", lease_s=60.0, deadline_s=3600.0)
    token = labeling_app.new_token()
    prefix = f"/load-{run}"
    labeling_app.deploy(labeler_name=name, namespace=ns, store_root=root, token=token,
                        app_name=f"load-{run}", route_prefix=prefix)
    segs = hopper_segments(2 * args.queries // 10, 5)  # pairs reuse segments
    rng = np.random.default_rng(0)
    for s in range(0, args.queries, 2000):
        n = min(2000, args.queries - s)
        left, right = rng.integers(0, len(segs), n), rng.integers(0, len(segs), n)
        qids = ray.get(labeler.submit.remote(segs.take(left), segs.take(right)))
        ray.get(labeler.mark_ready.remote(qids))
    res = run_load(f"http://{host}:{port}{prefix}", token, args.labelers, args.seconds)
    check = check_store(root, res.pop("acknowledged"))
    record = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), **res, "store": check,
              "machine": {"cpus": os.cpu_count()}}
    print(json.dumps(record, indent=1))
    ok = res["server_errors"] == 0 and check["lost"] == 0 and check["stored_twice"] == 0
    print(f"{args.labelers} labelers, {res['seconds']} s: {res['labels_per_s']} labels/s, "
          f"next p95 {res['next_ms']['p95']} ms, label p95 {res['label_ms']['p95']} ms, "
          f"5xx {res['server_errors']}, lost {check['lost']}, stored twice "
          f"{check['stored_twice']} -> {'OK' if ok else 'FAILED'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    ray.shutdown()


if __name__ == "__main__":
    main()
