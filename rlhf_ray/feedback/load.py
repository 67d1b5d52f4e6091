"""Many scripted labelers against the labeling API at once (the load check of issue 7).

Each labeler loops as the page does: `GET /api/next` (lease a query), `POST /api/label`
(answer it), over real HTTP through Serve's proxy. Afterwards the store is read back: every
answer acknowledged with 200 must be stored exactly once (raw part files included), and no
request may have got a 5xx. Used by `tests/integration/test_labeling_api.py` (short) and
`benchmarks/labeling_load.py` (50 labelers, 60 s).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

from rlhf_ray.storage.store import PreferenceStore


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))], 2)


def run_load(base: str, token: str, labelers: int, seconds: float) -> dict:
    """`labelers` threads for `seconds`; returns statuses, acknowledged ids, latencies."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    stop = threading.Event()
    lock = threading.Lock()
    statuses: Counter = Counter()
    acked: list[str] = []
    next_ms: list[float] = []
    label_ms: list[float] = []

    def call(method: str, path: str, body=None) -> tuple[int, bytes]:
        req = urllib.request.Request(base.rstrip("/") + path, method=method, headers=headers,
                                     data=None if body is None else json.dumps(body).encode())
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, OSError) as e:  # connection refused / reset
            return 599, str(e).encode()

    def labeler(i: int) -> None:
        name = f"load{i}"
        while not stop.is_set():
            t0 = time.perf_counter()
            status, data = call("GET", f"/api/next?labeler={name}")
            t1 = time.perf_counter()
            with lock:
                statuses[f"next {status}"] += 1
                next_ms.append((t1 - t0) * 1e3)
            if status != 200:
                time.sleep(0.05)
                continue
            qid = json.loads(data)["query_id"]
            status, _ = call("POST", "/api/label", {"query_id": qid, "choice": "left",
                                                    "labeler": name})
            t2 = time.perf_counter()
            with lock:
                statuses[f"label {status}"] += 1
                label_ms.append((t2 - t1) * 1e3)
                if status == 200:
                    acked.append(qid)

    threads = [threading.Thread(target=labeler, args=(i,), daemon=True) for i in range(labelers)]
    t0 = time.time()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    elapsed = time.time() - t0
    return {
        "labelers": labelers, "seconds": round(elapsed, 1), "statuses": dict(statuses),
        "server_errors": sum(n for k, n in statuses.items() if int(k.split()[1]) >= 500),
        "acknowledged": acked, "labels_per_s": round(len(acked) / elapsed, 1),
        "next_ms": {"p50": _pct(next_ms, 50), "p95": _pct(next_ms, 95), "p99": _pct(next_ms, 99)},
        "label_ms": {"p50": _pct(label_ms, 50), "p95": _pct(label_ms, 95),
                     "p99": _pct(label_ms, 99)},
    }


def check_store(store_root: str, acked: list[str]) -> dict:
    """Acknowledged answers against the store: lost ones, and ids stored twice (raw parts)."""
    import pyarrow.parquet as pq

    stored = set(PreferenceStore(store_root).labels().column("query_id").to_pylist())
    raw = [q for p in sorted((Path(store_root) / "labels").glob("part-*.parquet"))
           for q in pq.read_table(p).column("query_id").to_pylist()]
    return {"acknowledged": len(acked), "acknowledged_twice": len(acked) - len(set(acked)),
            "stored": len(stored), "lost": len(set(acked) - stored),
            "stored_twice": len(raw) - len(set(raw))}
