"""Humans in the loop: a scripted labeler answers over HTTP while training runs (mixed mode),
then `rlhf-ray label RUN_DIR` serves what the run left pending."""

from __future__ import annotations

import os
import re
import threading
import time
from urllib.parse import parse_qs, urlparse

from conftest import Checked, Http

from rlhf_ray.config import load_config
from rlhf_ray.runtime.metrics import read_metrics
from rlhf_ray.storage.store import PreferenceStore
from rlhf_ray.train import train

FAST_CLIPS = ["labeler.clips.width=64", "labeler.clips.height=48", "labeler.clips.frame_skip=5"]


def scripted_human(url: str, name: str, stop: threading.Event, answered: list, limit: int,
                   asked: set | None = None):
    """Answers what the page offers (the left clip, always) until told to stop; `asked`
    collects the questions the page put."""
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
        if asked is not None:
            asked.add(q["instruction"])
        status, _ = http.request("POST", "/api/label", {"query_id": q["query_id"],
                                                        "choice": "left", "labeler": name})
        if status == 200:
            answered.append(q["query_id"])


def test_training_goes_on_while_humans_and_the_oracle_label(ray_cluster, serve_http, tmp_path):
    host, port = serve_http
    cfg = load_config("hopper-smoke", ["labeler.source=mixed", "labeler.deadline_s=4",
                                       "run.total_env_steps=12000",
                                       f"labeler.port={port}", *FAST_CLIPS])
    run_dir = tmp_path / "run"
    stop, answered, asked = threading.Event(), [], set()

    def human():
        url_file = run_dir / "labeling_url.txt"
        while not url_file.exists() and not stop.is_set():
            time.sleep(0.2)
        if url_file.exists():
            scripted_human(url_file.read_text().strip(), "script", stop, answered, limit=12,
                           asked=asked)

    t = Checked(human)
    t.start()
    try:
        train(cfg, run_dir=str(run_dir), progress=False)
    finally:
        stop.set()
    t.finish(timeout=60)
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
    assert asked == {cfg.labeler.instruction} and "forward" in cfg.labeler.instruction

    # afterwards: `rlhf-ray label RUN_DIR` serves what is still pending, until nothing is
    pending = [q.query_id for q in store.pending_queries()]
    if not pending:  # the oracle took everything: ask one more question so there is work
        from rlhf_ray.feedback.labeler import Labeler
        from rlhf_ray.feedback.queries import ClipPairs

        segs = store.segments([labels[0]["left_id"], labels[0]["right_id"]])
        pending = Labeler(str(run_dir / "preferences"), ClipPairs(), source="human",
                          seed=9).submit(
            segs.take([0]), segs.take([1]))
    label_three_runs_at_once(run_dir, port, pending)


def label_three_runs_at_once(run_dir, port, pending):
    """Three stopped runs with the same pending queries, labeled at once: two on the test's
    cluster (each app at its own /label/<run> prefix) and one by `rlhf-ray label` in a
    process of its own, which starts a second local cluster on this machine (its Serve must
    not share the first one's port). Each is labeled through its own printed URL; every
    label lands in its own store and no token opens another run's page."""
    import shutil
    import subprocess
    import sys

    from rlhf_ray.label import label_run

    runs = {"a": run_dir, "b": run_dir.parent / "run-b", "c": run_dir.parent / "run-c"}
    for who in "bc":
        shutil.copytree(run_dir, runs[who])
    stop, answered, urls, threads = threading.Event(), {w: [] for w in runs}, {}, []

    cross = []  # (status) of every earlier run's token tried on a later run's page

    lock = threading.Lock()

    def human(who, url):
        u = urlparse(url)
        with lock:  # pages announced at the same moment still see each other
            for other in list(urls.values()):  # this page is up with work: try other tokens
                token = parse_qs(urlparse(other).query)["token"][0]
                cross.append(Http(f"{u.scheme}://{u.netloc}{u.path}", token).request(
                    "GET", "/api/status")[0])
            urls[who] = url
        th = Checked(scripted_human, url, f"late-{who}", stop, answered[who], 10_000)
        th.start()
        threads.append(th)

    done = {}

    def label_in_process(who):
        done[who] = label_run(str(runs[who]), [f"labeler.port={port}", *FAST_CLIPS],
                              exit_when_done=True, poll_s=0.5,
                              on_url=lambda url, who=who: human(who, url))

    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf_ray.cli", "label", str(runs["c"]), "--exit-when-done",
         f"labeler.port={port}", *FAST_CLIPS], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env={**os.environ, "RAY_ADDRESS": ""})
    in_process = [Checked(label_in_process, w) for w in "ab"]
    for th in in_process:
        th.start()
    out = []
    try:
        for line in proc.stdout:  # the URL it prints, once checked to reach its own app
            out.append(line)
            m = re.search(r"labeling page: (\S+)", line)
            if m:
                human("c", m.group(1))
        assert proc.wait(timeout=300) == 0, "".join(out)[-3000:]
        for th in in_process:
            th.finish(timeout=300)
    finally:
        stop.set()
        proc.kill()
    for th in threads:
        th.finish(timeout=60)
    assert done == {"a": 0, "b": 0}
    assert len({urlparse(u).path for u in urls.values()}) == 3, urls  # a page each
    assert urlparse(urls["c"]).port != port, urls  # the second cluster's Serve moved aside
    for who, folder in runs.items():
        rows = [r for r in PreferenceStore(str(folder / "preferences")).labels().to_pylist()
                if r["source"].startswith("human:late")]
        assert {r["source"] for r in rows} == {f"human:late-{who}"}, (who, rows)
        assert {r["query_id"] for r in rows} == set(pending) == set(answered[who])
    assert cross == [401, 401, 401]  # a run's token opens only its own page


def test_llm_rankings_from_people_and_the_oracle(ray_cluster, serve_http, tmp_path):
    """The LLM workload reuses the page unchanged: a scripted person ranks responses over HTTP
    (reverse order, so their labels are recognisable), the oracle takes what is left past
    the deadline, and PPO never waits."""
    host, port = serve_http
    cfg = load_config("llm-tiny-smoke", ["labeler.source=mixed", "labeler.deadline_s=3",
                                         f"labeler.port={port}", "labels.initial=16",
                                         "run.iterations=4"])
    run_dir = tmp_path / "llm"
    stop, answered, offered = threading.Event(), [], []

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
            offered.append((q["kind"], len(q["responses"])))  # checked in the test's thread
            order = list(range(len(q["responses"])))[::-1]
            status, _ = http.request("POST", "/api/label", {"query_id": q["query_id"],
                                                            "order": order, "labeler": "ranker"})
            if status == 200:
                answered.append(q["query_id"])

    t = Checked(human)
    t.start()
    try:
        train(cfg, run_dir=str(run_dir), progress=False)
    finally:
        stop.set()
    t.finish(timeout=60)
    assert offered and set(offered) == {("ranking", cfg.labels.responses_per_query)}
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
