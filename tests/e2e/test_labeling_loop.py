"""Humans in the loop: a scripted labeler answers over HTTP while training runs (mixed mode),
then `rlhf-ray label RUN_DIR` serves what the run left pending."""

from __future__ import annotations

import threading
import time
from urllib.parse import parse_qs, urlparse

from conftest import Http
from rlhf_ray.config import load_config
from rlhf_ray.train import train
from rlhf_ray.metrics import read_metrics
from rlhf_ray.store import PreferenceStore

FAST_CLIPS = ["labeler.clips.width=64", "labeler.clips.height=48", "labeler.clips.frame_skip=5"]


def scripted_human(url: str, name: str, stop: threading.Event, answered: list, limit: int):
    """Answers what the page offers (the left clip, always) until told to stop."""
    u = urlparse(url)
    http = Http(f"{u.scheme}://{u.netloc}{u.path}", parse_qs(u.query)["token"][0])
    while not stop.is_set() and len(answered) < limit:
        try:
            status, q = http.request("GET", f"/api/next?labeler={name}")
        except OSError:  # the app is not up yet, or already gone
            time.sleep(0.2)
            continue
        if status != 200:
            time.sleep(0.2)
            continue
        status, _ = http.request("POST", "/api/label", {"query_id": q["query_id"],
                                                        "choice": "left", "labeler": name})
        if status == 200:
            answered.append(q["query_id"])


def test_training_goes_on_while_humans_and_the_oracle_label(ray_cluster, serve_http, tmp_path):
    host, port = serve_http
    cfg = load_config("hopper-smoke", ["labeler.source=mixed", "labeler.deadline_s=4",
                                       "run.total_env_steps=16000",
                                       f"labeler.port={port}", *FAST_CLIPS])
    run_dir = tmp_path / "run"
    stop, answered = threading.Event(), []

    def human():
        url_file = run_dir / "labeling_url.txt"
        while not url_file.exists() and not stop.is_set():
            time.sleep(0.2)
        if url_file.exists():
            scripted_human(url_file.read_text().strip(), "script", stop, answered, limit=12)

    t = threading.Thread(target=human, daemon=True)
    t.start()
    try:
        train(cfg, run_dir=str(run_dir), progress=False)
    finally:
        stop.set()
        t.join(timeout=30)
    rows = read_metrics(run_dir)
    assert rows[-1]["env_steps"] >= cfg.run.total_env_steps  # training never waited
    assert (run_dir / "labeling_url.txt").stat().st_mode & 0o077 == 0  # the token stays private
    store = PreferenceStore(str(run_dir / "preferences"))
    labels = store.labels().to_pylist()
    by_source = {}
    for r in labels:
        by_source[r["source"]] = by_source.get(r["source"], 0) + 1
    assert by_source.get("human:script", 0) == len(answered) >= 2
    assert by_source.get("oracle", 0) >= 1  # the deadline passed for what the human left
    assert rows[-1]["labels_human"] == len(answered)
    assert rows[-1]["labels_oracle"] == by_source["oracle"]
    assert {r["query_id"] for r in labels if r["source"] == "human:script"} == set(answered)
    assert all(r["label"] == "left" for r in labels if r["source"] == "human:script")
    assert rows[-1]["rm_version"] >= 1

    # afterwards: `rlhf-ray label RUN_DIR` serves what is still pending, until nothing is
    pending = [q.query_id for q in store.pending_queries()]
    if not pending:  # the oracle took everything: ask one more question so there is work
        from rlhf_ray.labeler import Labeler

        segs = store.segments([labels[0]["left_id"], labels[0]["right_id"]])
        pending = Labeler(str(run_dir / "preferences"), source="human", seed=9).submit(
            segs.take([0]), segs.take([1]))
    from rlhf_ray.labeling.service import label_run

    stop2, later = threading.Event(), []
    threads = []

    def on_url(url):
        th = threading.Thread(target=scripted_human, args=(url, "late", stop2, later, 10_000),
                              daemon=True)
        th.start()
        threads.append(th)

    try:
        assert label_run(str(run_dir), [f"labeler.port={port}", *FAST_CLIPS],
                         exit_when_done=True, poll_s=0.5, on_url=on_url) == 0
    finally:
        stop2.set()
        for th in threads:
            th.join(timeout=30)
    assert set(later) == set(pending)
    assert PreferenceStore(str(run_dir / "preferences")).pending_queries() == []


def test_llm_rankings_from_people_and_the_oracle(ray_cluster, serve_http, tmp_path):
    """The LLM workload reuses the page unchanged: a scripted person ranks responses over HTTP
    (reverse order, so their labels are recognisable), the oracle takes what is left past
    the deadline, and PPO never waits."""
    host, port = serve_http
    cfg = load_config("llm-tiny-smoke", ["labeler.source=mixed", "labeler.deadline_s=3",
                                         f"labeler.port={port}", "labels.initial=16",
                                         "run.iterations=4"])
    run_dir = tmp_path / "llm"
    stop, answered = threading.Event(), []

    def human():
        url_file = run_dir / "labeling_url.txt"
        while not url_file.exists() and not stop.is_set():
            time.sleep(0.2)
        if not url_file.exists():
            return
        u = urlparse(url_file.read_text().strip())
        http = Http(f"{u.scheme}://{u.netloc}{u.path}", parse_qs(u.query)["token"][0])
        while not stop.is_set() and len(answered) < 6:
            try:
                status, q = http.request("GET", "/api/next?labeler=ranker")
            except OSError:
                time.sleep(0.2)
                continue
            if status != 200:
                time.sleep(0.2)
                continue
            assert q["kind"] == "ranking" and len(q["responses"]) == cfg.labels.responses_per_query
            order = list(range(len(q["responses"])))[::-1]
            status, _ = http.request("POST", "/api/label", {"query_id": q["query_id"],
                                                            "order": order, "labeler": "ranker"})
            if status == 200:
                answered.append(q["query_id"])

    t = threading.Thread(target=human, daemon=True)
    t.start()
    try:
        train(cfg, run_dir=str(run_dir), progress=False)
    finally:
        stop.set()
        t.join(timeout=30)
    rows = read_metrics(run_dir)
    assert len(rows) == cfg.run.iterations  # PPO ran every iteration
    assert rows[-1]["labels_human"] == len(answered) >= 2
    assert rows[-1]["labels_oracle"] >= 1
    labels = PreferenceStore(str(run_dir / "preferences")).labels().to_pylist()
    human = [r for r in labels if r["source"] == "human:ranker"]
    k = cfg.labels.responses_per_query
    assert len(human) == len(answered) * k * (k - 1) // 2  # each ranking as C(K,2) pairs
    assert {r["ranking_id"] for r in human} == set(answered)
    assert all(r["label"] == "right" for r in human)  # reverse order: the later item wins
