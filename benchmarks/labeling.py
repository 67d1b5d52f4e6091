"""Labeling latency and throughput while training runs (a script, not a test).

Starts a real training run with `labeler.source=human` (Hopper by default, real clip rendering)
and N scripted labelers that talk to the labeling app over HTTP exactly as the page does:

  answer -> next pair ready  =  POST /api/label (200 once durable) + GET /api/next
                                + GET both clips
  answer only                =  POST /api/label

The page preloads the next pair while the labeler watches the current one, so what a person
sees after an answer is a DOM swap; the figures here are the server path without that help.
When no query is ready (clips still rendering, or training has not asked for more) a labeler
waits; that time is reported as `starved_s`, not counted as latency.

    python benchmarks/labeling.py                          # hopper, 1 labeler at 3 s per label
    python benchmarks/labeling.py --think 0 --out docs/results/labeling_think0.json
                                                           # as fast as clips render
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def labeler_loop(url: str, name: str, stop: threading.Event, think_s: float, out: dict) -> None:
    import urllib.error
    import urllib.request

    u = urlparse(url)
    base = f"{u.scheme}://{u.netloc}{u.path.rstrip('/')}"
    token = parse_qs(u.query)["token"][0]
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def call(method, path, body=None):
        req = urllib.request.Request(base + path, method=method, headers=headers,
                                     data=None if body is None else json.dumps(body).encode())
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                data = r.read()
                return r.status, data
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def fetch_next():
        status, data = call("GET", f"/api/next?labeler={name}")
        if status != 200:
            return None
        q = json.loads(data)
        if q["kind"] == "clip":  # both clips at once, as a browser loads two <video>s
            codes = list(pool.map(lambda side: call("GET", "/" + q[side])[0], ("left", "right")))
            out["errors"] += sum(c != 200 for c in codes)
        return q

    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(2)
    current = None
    while not stop.is_set():
        if current is None:
            t0 = time.perf_counter()
            current = fetch_next()
            if current is None:
                time.sleep(0.1)
                out["starved_s"] += time.perf_counter() - t0
            continue
        if think_s:
            time.sleep(think_s)
        t0 = time.perf_counter()
        status, _ = call("POST", "/api/label", {"query_id": current["query_id"], "choice": "left",
                                                "labeler": name})
        t1 = time.perf_counter()
        if status != 200:
            out["errors"] += 1
        out["answer_ms"].append((t1 - t0) * 1e3)
        out["labels"] += 1
        current = fetch_next()
        t2 = time.perf_counter()
        if current is not None:
            out["next_ready_ms"].append((t2 - t0) * 1e3)
        else:
            out["starved_s"] += t2 - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="hopper")
    ap.add_argument("--labelers", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=150.0, help="labeling time measured")
    ap.add_argument("--think", type=float, default=3.0,
                    help="seconds a labeler looks per pair (the paper's labelers: 3-5 s)")
    ap.add_argument("--out", default="docs/results/labeling_think3.json")
    ap.add_argument("overrides", nargs="*", help="config key=value for the training run")
    args = ap.parse_args()
    os.environ.setdefault("MUJOCO_GL", "egl")

    import ray

    from rlhf_ray.config import load_config
    from rlhf_ray.train import train

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    overrides = ["labeler.source=human", "labels.budget=400", "run.total_env_steps=10000000",
                 "run.checkpoint_every=0", *args.overrides]
    cfg = load_config(args.preset, overrides)
    run_dir = Path("runs") / f"bench-labeling-{int(time.time())}"
    stop = threading.Event()
    results = [{"answer_ms": [], "next_ready_ms": [], "labels": 0, "errors": 0, "starved_s": 0.0}
               for _ in range(args.labelers)]
    measured = {}

    def driver():
        url_file = run_dir / "labeling_url.txt"
        while not url_file.exists():
            time.sleep(0.2)
        url = url_file.read_text().strip()
        # let the initial queries render before measuring
        time.sleep(5)
        threads = [threading.Thread(target=labeler_loop, args=(url, f"bench{i}", stop, args.think, r),
                                    daemon=True) for i, r in enumerate(results)]
        t0 = time.time()
        for t in threads:
            t.start()
        time.sleep(args.seconds)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        measured["seconds"] = time.time() - t0
        end_run.set()

    end_run = threading.Event()
    rows: list[dict] = []
    threading.Thread(target=driver, daemon=True).start()
    train(cfg, run_dir=str(run_dir), on_metrics=rows.append, progress=False, stop_event=end_run)
    ans = [x for r in results for x in r["answer_ms"]]
    nxt = [x for r in results for x in r["next_ready_ms"]]
    labels = sum(r["labels"] for r in results)
    secs = measured.get("seconds", args.seconds)
    record = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "preset": args.preset,
        "overrides": overrides, "labelers": args.labelers, "think_s": args.think,
        "seconds": round(secs, 1), "labels": labels,
        "labels_per_min": round(labels / secs * 60, 1),
        "answer_ms": {"p50": round(pct(ans, 50), 1), "p95": round(pct(ans, 95), 1)},
        "next_ready_ms": {"p50": round(pct(nxt, 50), 1), "p95": round(pct(nxt, 95), 1),
                          "n": len(nxt)},
        "starved_s": round(sum(r["starved_s"] for r in results), 1),
        "errors": sum(r["errors"] for r in results),
        "training_iterations_during": len(rows),
        "env_steps_per_s": (round((rows[-1]["env_steps"] - rows[0]["env_steps"])
                                  / (rows[-1]["time_s"] - rows[0]["time_s"]), 1)
                            if len(rows) >= 2 else None),
        "machine": {"cpus": os.cpu_count()},
    }
    print(json.dumps(record, indent=1))
    target = "met" if record["next_ready_ms"]["p95"] < 150 else "NOT met"
    print(f"answer -> next pair ready: p50 {record['next_ready_ms']['p50']} ms, "
          f"p95 {record['next_ready_ms']['p95']} ms (target p95 < 150 ms: {target}); "
          f"{record['labels_per_min']} labels/min sustained, labeler starved {record['starved_s']} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    ray.shutdown()


if __name__ == "__main__":
    main()
