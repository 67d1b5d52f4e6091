"""The labeling app's HTTP contract, every status code, against the real app on Ray Serve."""

from __future__ import annotations

import time
import uuid
from contextlib import contextmanager

import numpy as np
import pytest
from conftest import Http, hopper_segments


@contextmanager
def _serve_labeling(ray, serve_http, kind, root: str, renderer: bool):
    """A labeler asking queries of `kind` on the store `root`, its labeling app (and a clip
    renderer); yields what the tests use, then removes them."""
    from ray import serve

    from rlhf_ray.feedback import app as labeling_app
    from rlhf_ray.feedback.clips import ClipRenderWorker
    from rlhf_ray.feedback.labeler import Labeler
    from rlhf_ray.storage.store import PreferenceStore

    run = uuid.uuid4().hex[:6]
    name = f"rlhf-labeler-test-{run}"
    ns = ray.get_runtime_context().namespace
    labeler = ray.remote(Labeler).options(name=name, num_cpus=0).remote(
        root, kind, source="human", seed=0, budget=40, lease_s=60.0, deadline_s=120.0)
    render = ray.remote(ClipRenderWorker).options(num_cpus=0).remote(
        name, ns, root, {"id": "Hopper-v5", "kwargs": {}}, 96, 72, 25, 2) if renderer else None
    token = labeling_app.new_token()
    prefix = f"/label-{run}"
    labeling_app.deploy(labeler_name=name, namespace=ns, store_root=root, token=token,
                        app_name=f"label-{run}", route_prefix=prefix)
    host, port = serve_http
    yield {"http": Http(f"http://{host}:{port}{prefix}", token), "labeler": labeler,
           "store": PreferenceStore(root), "token": token, "renderer": render}
    serve.delete(f"label-{run}")
    for actor in (render, labeler):
        if actor is not None:
            ray.kill(actor)


@pytest.fixture(scope="module")
def app(ray_cluster, serve_http, tmp_path_factory):
    """Clip pairs, as the control workload asks them."""
    from rlhf_ray.feedback.queries import ClipPairs

    root = str(tmp_path_factory.mktemp("labeling") / "preferences")
    with _serve_labeling(ray_cluster, serve_http, ClipPairs(), root, renderer=True) as out:
        yield out


@pytest.fixture(scope="module")
def text_app(ray_cluster, serve_http, tmp_path_factory):
    """Text comparisons and rankings, as the LLM workload asks them."""
    from rlhf_ray.feedback.queries import TextRankings

    root = str(tmp_path_factory.mktemp("text") / "preferences")
    with _serve_labeling(ray_cluster, serve_http, TextRankings(), root, renderer=False) as out:
        yield out


def wait_next(http: Http, labeler: str, timeout: float = 90.0, **kw):
    """Poll /api/next until a query is ready (clips render in the background)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        status, body = http.request("GET", f"/api/next?labeler={labeler}", **kw)
        if status != 204:
            return status, body
        time.sleep(0.2)
    raise AssertionError("no query became ready")


def test_empty_queue_is_204_and_token_is_required(app):
    http = app["http"]
    r = http.request("GET", "/api/next?labeler=ann")
    assert r[0] == 204, r
    assert http.request("GET", "/api/next", token=None)[0] == 401
    assert http.request("GET", "/api/next", token="x" * 32)[0] == 401
    assert http.request("GET", "/api/status", token=None)[0] == 401
    assert http.request("POST", "/api/label", {"query_id": "q", "choice": "left"}, token=None)[0] == 401
    assert http.request("GET", "/", token=None)[0] == 401
    # the page and the clips take the token from the URL (a <video> cannot send headers)
    status, page = http.request("GET", f"/?token={app['token']}", token=None)
    assert status == 200 and b"Which one is better?" in page
    assert http.request("GET", f"/api/next?labeler=ann&token={app['token']}", token=None)[0] == 204


def test_clip_query_contract(app):
    ray = pytest.importorskip("ray")
    http, labeler = app["http"], app["labeler"]
    segs = hopper_segments(4, 12)
    qids = ray.get(labeler.submit.remote(segs.take([0, 1]), segs.take([2, 3]), rm_version=5))
    status, q = wait_next(http, "ann")
    assert status == 200 and q["kind"] == "clip" and q["query_id"] in qids
    assert q["left"].endswith(".webm") and q["right"].endswith(".webm")
    # the clip is a real WebM (EBML magic), served with the token in the URL
    status, clip = http.request("GET", f"/{q['left']}?token={app['token']}", token=None)
    assert status == 200 and clip[:4] == b"\x1a\x45\xdf\xa3" and len(clip) > 1000
    assert http.request("GET", f"/{q['left']}", token=None)[0] == 401
    assert http.request("GET", "/clips/nope.webm")[0] == 404
    # leased: another labeler gets the other query, not this one
    status, q2 = wait_next(http, "bob")
    assert status == 200 and q2["query_id"] != q["query_id"]
    # answers
    ok = http.request("POST", "/api/label", {"query_id": q["query_id"], "choice": "right",
                                             "labeler": "ann"})
    assert ok == (200, {"status": "stored", "query_id": q["query_id"]})
    again = http.request("POST", "/api/label", {"query_id": q["query_id"], "choice": "right",
                                                "labeler": "ann"})
    assert again[0] == 200 and again[1]["status"] == "duplicate"
    assert http.request("POST", "/api/label", {"query_id": q["query_id"], "choice": "left"})[0] == 409
    assert http.request("POST", "/api/label", {"query_id": "f" * 32, "choice": "left"})[0] == 404
    # malformed bodies and choices
    assert http.request("POST", "/api/label", {"query_id": q2["query_id"], "choice": "up"})[0] == 422
    assert http.request("POST", "/api/label", raw=b"{not json")[0] == 422
    assert http.request("POST", "/api/label", {"query_id": q2["query_id"]})[0] == 422
    assert http.request("POST", "/api/label", {"query_id": q2["query_id"], "choice": "left",
                                               "extra": 1})[0] == 422
    assert http.request("POST", "/api/label", {"query_id": q2["query_id"], "choice": "left",
                                               "labeler": "no spaces"})[0] == 422
    big = {"query_id": q2["query_id"], "choice": "left", "pad": "x" * 70_000}
    assert http.request("POST", "/api/label", big)[0] == 413
    # none of the refused requests stored anything
    rows = app["store"].labels().to_pylist()
    assert [(r["query_id"], r["label"], r["source"]) for r in rows] == [
        (q["query_id"], "right", "human:ann")]
    assert http.request("POST", "/api/label", {"query_id": q2["query_id"], "choice": "skip",
                                               "labeler": "bob"})[0] == 200
    status, s = http.request("GET", "/api/status")
    assert status == 200 and s["answered"] == 2 and s["pending"] == 0 and s["budget"] == 40
    assert s["answered_by_source"] == {"human:ann": 1, "human:bob": 1}


def test_text_and_ranking_contract(text_app):
    import ray

    app = text_app
    http, labeler = app["http"], app["labeler"]
    ids = ray.get(labeler.submit.remote(
        ["Say hi.", "Count to three."], [["hi", "hello there"], ["1 2 3", "one", "1, 2, 3", "3 2 1"]]))
    status, q = http.request("GET", "/api/next?labeler=cy")
    assert status == 200 and q["kind"] == "text" and q["prompt"] == "Say hi."
    assert (q["left"], q["right"]) == ("hi", "hello there")
    assert http.request("POST", "/api/label", {"query_id": q["query_id"], "choice": "left",
                                               "labeler": "cy"})[0] == 200
    status, r = http.request("GET", "/api/next?labeler=cy")
    assert status == 200 and r["kind"] == "ranking" and len(r["responses"]) == 4
    assert r["query_id"] == ids[1]
    # a ranking needs a permutation of its responses; a plain choice is refused
    assert http.request("POST", "/api/label", {"query_id": r["query_id"], "order": [0, 1, 1, 2]})[0] == 422
    assert http.request("POST", "/api/label", {"query_id": r["query_id"], "choice": "left"})[0] == 422
    assert http.request("POST", "/api/label", {"query_id": r["query_id"], "order": [2, 0],
                                               "choice": "left"})[0] == 422
    order = [2, 0, 1, 3]
    assert http.request("POST", "/api/label", {"query_id": r["query_id"], "order": order,
                                               "labeler": "cy"})[0] == 200
    assert http.request("POST", "/api/label", {"query_id": r["query_id"], "order": order})[1]["status"] == "duplicate"
    assert http.request("POST", "/api/label", {"query_id": r["query_id"], "order": [0, 1, 2, 3]})[0] == 409
    rows = [x for x in app["store"].labels().to_pylist() if x["ranking_id"] == r["query_id"]]
    assert len(rows) == 6  # C(4, 2) comparisons, one ranking id
    pos = {item: p for p, item in enumerate(order)}
    items = ray.get(labeler.stats.remote())  # noqa: F841 - the actor is alive and answering
    texts = app["store"].texts([x["left_id"] for x in rows] + [x["right_id"] for x in rows])
    resp = r["responses"]
    for x in rows:
        i, j = resp.index(texts[x["left_id"]][1]), resp.index(texts[x["right_id"]][1])
        assert x["label"] == ("left" if pos[i] < pos[j] else "right")
    assert http.request("GET", "/api/next?labeler=cy")[0] == 204


def test_fuzzed_bodies_never_break_the_contract(app):
    """Whatever the body -- any JSON, any bytes -- the API answers with a client error it
    documents (4xx), never a 5xx, and stores nothing."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    http, store = app["http"], app["store"]
    before = len(store.labels())
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40)
    values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(
        st.text(max_size=12), c, max_size=4), max_leaves=12)
    bodies = st.dictionaries(st.sampled_from(["query_id", "choice", "labeler", "order", "x"]) |
                             st.text(max_size=10), values, max_size=5)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies | values, raw=st.none() | st.binary(max_size=300))
    def check(body, raw):
        status, _ = http.request("POST", "/api/label", body=body, raw=raw)
        assert 400 <= status < 500, (status, body, raw)

    check()
    assert len(store.labels()) == before


def test_fifty_labelers_at_once_no_5xx_nothing_lost_or_doubled(app):
    """50 scripted labelers hammer /api/next and /api/label (8 s here; 60 s in
    benchmarks/labeling_load.py): no 5xx, every acknowledged answer stored exactly once."""
    import ray

    from rlhf_ray.feedback.load import check_store, run_load

    labeler, http = app["labeler"], app["http"]
    segs = hopper_segments(400, 5, seed=3)
    qids = ray.get(labeler.submit.remote(segs.take(np.arange(0, 400, 2)),
                                         segs.take(np.arange(1, 400, 2))))
    ray.get(labeler.mark_ready.remote(qids))  # clips are not what this measures
    res = run_load(http.base, app["token"], labelers=50, seconds=8)
    assert res["server_errors"] == 0, res["statuses"]
    assert res["acknowledged"], res["statuses"]
    check = check_store(str(app["store"].root), res["acknowledged"])
    assert check["lost"] == 0 and check["stored_twice"] == 0, check
    assert check["acknowledged_twice"] == 0, check  # a lease gives a query to one labeler


def test_labeling_app_builds_from_a_run_folder(ray_cluster, serve_http, tmp_path, monkeypatch):
    """The Serve app builder behind serve/labeling.yaml and the RayService: a run folder in,
    the page out, with its own detached labeler; no token, no app."""
    import ray
    from ray import serve

    from rlhf_ray.config import dump_config, load_config
    from rlhf_ray.label import app_builder

    run = tmp_path / "served"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(load_config("hopper-smoke")))
    monkeypatch.delenv("RLHF_LABEL_TOKEN", raising=False)
    with pytest.raises(ValueError, match="token"):
        app_builder({"run_dir": str(run)})
    with pytest.raises(ValueError, match="not a run folder"):
        app_builder({"run_dir": str(tmp_path / "nope"), "token": "t" * 24})
    monkeypatch.setenv("RLHF_LABEL_TOKEN", "t" * 24)
    serve.run(app_builder({"run_dir": str(run)}), name="label-built", route_prefix="/label-built",
              blocking=False)
    host, port = serve_http
    http = Http(f"http://{host}:{port}/label-built", "t" * 24)
    try:
        deadline = time.time() + 60
        status, body = http.request("GET", "/api/status")
        while status != 200 and time.time() < deadline:
            time.sleep(0.5)
            status, body = http.request("GET", "/api/status")
        assert status == 200, body
        assert http.request("GET", "/api/status", token=None)[0] == 401
        assert (run / "preferences" / "labels").is_dir()  # the labeler opened the run's store
    finally:
        serve.delete("label-built")
        for a in ray.util.list_named_actors(all_namespaces=True):
            if a["namespace"] == "rlhf-labeling" and "served-served" in a["name"]:
                ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]))
