"""A real headless Chromium labels 10 clip pairs on the real page, with clicks and keys."""

from __future__ import annotations

import itertools
import os
import shutil
import uuid

import pytest
from conftest import hopper_segments

pytestmark = pytest.mark.browser
CHROMIUM = os.environ.get("RLHF_RAY_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--autoplay-policy=no-user-gesture-required"]


@pytest.fixture(scope="module")
def labeling(ray_cluster, serve_http, tmp_path_factory):
    ray = ray_cluster
    from ray import serve

    from rlhf_ray.feedback import app as labeling_app
    from rlhf_ray.feedback.clips import ClipRenderWorker
    from rlhf_ray.feedback.labeler import Labeler
    from rlhf_ray.feedback.queries import ClipPairs
    from rlhf_ray.storage.store import PreferenceStore

    root = str(tmp_path_factory.mktemp("browser") / "preferences")
    run = uuid.uuid4().hex[:6]
    name = f"rlhf-labeler-browser-{run}"
    ns = ray.get_runtime_context().namespace
    labeler = ray.remote(Labeler).options(name=name, num_cpus=0).remote(
        root, ClipPairs(), source="human", seed=0, budget=10, lease_s=60.0, deadline_s=120.0)
    segs = hopper_segments(5, 20, seed=1)  # 5 segments: all 10 pairs, 5 clips to render
    pairs = list(itertools.combinations(range(5), 2))
    qids = ray.get(labeler.submit.remote(segs.take([a for a, _ in pairs]),
                                         segs.take([b for _, b in pairs]), rm_version=0))
    renderer = ray.remote(ClipRenderWorker).options(num_cpus=0).remote(
        name, ns, root, {"id": "Hopper-v5", "kwargs": {}}, 160, 120, 25, 2)
    token = labeling_app.new_token()
    prefix = f"/label-{run}"
    from rlhf_ray.config import load_config

    instruction = load_config("hopper").labeler.instruction  # the preset's question to people
    labeling_app.deploy(labeler_name=name, namespace=ns, store_root=root, token=token,
                        app_name=f"label-{run}", route_prefix=prefix, instruction=instruction)
    host, port = serve_http
    yield {"url": f"http://{host}:{port}{prefix}/?token={token}&labeler=tester",
           "store": PreferenceStore(root), "qids": qids, "instruction": instruction}
    serve.delete(f"label-{run}")
    ray.kill(renderer)
    ray.kill(labeler)


def video_time_advances(page, side: str) -> bool:
    sel = f"#{side} video"
    page.wait_for_function(f"document.querySelector('{sel}') && "
                           f"document.querySelector('{sel}').readyState >= 2", timeout=30_000)
    t0 = page.eval_on_selector(sel, "v => v.currentTime")
    page.wait_for_timeout(400)
    t1 = page.eval_on_selector(sel, "v => v.currentTime")
    decoded = page.eval_on_selector(sel, "v => v.videoWidth > 0 && v.videoHeight > 0")
    return decoded and t1 != t0  # looping clips: time moves on (or wraps around)


def test_chromium_labels_ten_pairs(labeling, tmp_path):
    if not shutil.which(CHROMIUM) and not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} missing: ./scripts/test installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    plan = ["left", "right", "equal", "skip"]
    keys = {"left": "ArrowLeft", "right": "ArrowRight", "equal": "ArrowUp", "skip": "ArrowDown"}
    expected: dict[str, str] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1000, "height": 640})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(labeling["url"])
        previous = ""
        for i in range(10):
            page.wait_for_function(
                f"document.body.dataset.queryId && document.body.dataset.queryId !== '{previous}'",
                timeout=120_000)
            qid = page.evaluate("document.body.dataset.queryId")
            assert qid in labeling["qids"] and qid not in expected
            assert page.inner_text("#task") == labeling["instruction"]
            if i in (0, 5, 9):
                assert video_time_advances(page, "left") and video_time_advances(page, "right")
            if i == 0:
                page.screenshot(path=str(tmp_path / "labeling.png"))
                if os.environ.get("RLHF_RAY_SCREENSHOT"):
                    page.screenshot(path=os.environ["RLHF_RAY_SCREENSHOT"])
            choice = plan[i % 4]
            if i % 2 == 0:
                page.keyboard.press(keys[choice])
            else:
                page.click(f"#btn-{choice}")
            expected[qid] = choice
            page.wait_for_function(f"document.body.dataset.answered === '{i + 1}'", timeout=30_000)
            previous = qid
        page.wait_for_selector("#empty", state="visible", timeout=30_000)
        assert not errors, errors
        browser.close()
    assert (tmp_path / "labeling.png").stat().st_size > 5_000
    rows = labeling["store"].labels().to_pylist()
    got = {r["query_id"]: r["label"] for r in rows}
    assert got == expected
    assert {r["source"] for r in rows} == {"human:tester"}


def _deploy_text_page(ray, labeler_name, root, run, serve_http, instruction="") -> str:
    """The labeling app for `labeler_name`; returns the page's URL (token included)."""
    from rlhf_ray.feedback import app as labeling_app

    token = labeling_app.new_token()
    labeling_app.deploy(labeler_name=labeler_name, namespace=ray.get_runtime_context().namespace,
                        store_root=root, token=token, app_name=f"label-{run}",
                        route_prefix=f"/label-{run}", instruction=instruction)
    host, port = serve_http
    return f"http://{host}:{port}/label-{run}/?token={token}&labeler=reader"


def _open(p, url, query_id):
    """Chromium on the page, once it shows `query_id`."""
    browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    page.goto(url)
    page.wait_for_function(f"document.body.dataset.queryId === '{query_id}'", timeout=30_000)
    return browser, page


def test_chromium_labels_text_pairs_and_rankings(ray_cluster, serve_http, tmp_path):
    """The same page: a prompt with two responses (keys), a ranking typed with number keys,
    a ranking put in order by dragging."""
    ray = ray_cluster
    from playwright.sync_api import sync_playwright
    from ray import serve

    from rlhf_ray.feedback.labeler import Labeler
    from rlhf_ray.feedback.queries import TextRankings
    from rlhf_ray.storage.store import PreferenceStore

    root = str(tmp_path / "preferences")
    run = uuid.uuid4().hex[:6]
    name = f"rlhf-labeler-text-{run}"
    labeler = ray.remote(Labeler).options(name=name, num_cpus=0).remote(root, TextRankings(),
                                                                         "human")
    q_text, q_keys, q_drag = ray.get(labeler.submit.remote(
        ["Greet me.", "Order these numbers.", "Pick the longest."],
        [["hello", "go away"], ["one", "two", "three", "four"], ["a", "bb", "ccc"]]))
    url = _deploy_text_page(ray, name, root, run, serve_http)
    try:
        with sync_playwright() as p:
            browser, page = _open(p, url, q_text)
            assert page.inner_text("#prompt") == "Greet me."
            assert page.inner_text("#left pre") == "hello"
            page.keyboard.press("ArrowLeft")
            page.wait_for_function(f"document.body.dataset.queryId === '{q_keys}'", timeout=30_000)
            assert page.is_visible("#ranklist") and not page.is_visible("#btn-left")
            for key in "3142"[:3]:  # three, one, four; "two" is implied last
                page.keyboard.press(key)
            page.keyboard.press("Enter")
            page.wait_for_function(f"document.body.dataset.queryId === '{q_drag}'", timeout=30_000)
            page.screenshot(path=str(tmp_path / "ranking.png"))
            # drag "ccc" (index 2) above "a" (index 0), then click submit
            page.locator("#ranklist li[data-index='2']").drag_to(
                page.locator("#ranklist li[data-index='0']"), target_position={"x": 20, "y": 2})
            order = page.eval_on_selector_all("#ranklist li", "xs => xs.map(x => +x.dataset.index)")
            assert order == [2, 0, 1]
            page.click("#btn-submit")
            page.wait_for_selector("#empty", state="visible", timeout=30_000)
            browser.close()
        rows = PreferenceStore(root).labels().to_pylist()
        plain = [r for r in rows if not r["ranking_id"]]
        assert [(r["query_id"], r["label"], r["source"]) for r in plain] == [(q_text, "left", "human:reader")]
        texts = PreferenceStore(root).texts([r["left_id"] for r in rows] + [r["right_id"] for r in rows])

        def better(rid):
            return {(texts[r["left_id"]][1], texts[r["right_id"]][1]): r["label"]
                    for r in rows if r["ranking_id"] == rid}

        keys = better(q_keys)  # three > one > four > two
        assert len(keys) == 6 and keys[("one", "two")] == "left" and keys[("one", "three")] == "right"
        assert keys[("three", "four")] == "left" and keys[("two", "four")] == "right"
        drag = better(q_drag)  # ccc > a > bb
        assert drag == {("a", "bb"): "left", ("a", "ccc"): "right", ("bb", "ccc"): "right"}
    finally:
        serve.delete(f"label-{run}")
        ray.kill(labeler)


def test_chromium_shows_a_real_tokenizers_continuations_and_the_task(ray_cluster, serve_http,
                                                                      tmp_path):
    """Continuations decoded by SmolLM2's tokenizer (Unicode, leading spaces, a newline, runs
    of spaces) appear exactly as decoded, under the preset's instruction text."""
    ray = ray_cluster
    from playwright.sync_api import sync_playwright

    from rlhf_ray.config import load_config
    from rlhf_ray.feedback.labeler import Labeler
    from rlhf_ray.feedback.queries import TextRankings
    from rlhf_ray.llm import assets
    from rlhf_ray.llm.modeling import load_tokenizer

    tok = load_tokenizer(str(assets.get("smollm2-135m", quiet=True)))
    raw = [" a café crème of a film — 10/10 ✨", " dull,\n  and  \"long\" (2 h)…", " 映画 good"]
    texts = [tok.decode(tok(t, add_special_tokens=False)["input_ids"]) for t in raw]
    assert texts == raw  # the byte-level BPE round-trips them
    instruction = load_config("smollm2-reviews").labeler.instruction
    root = str(tmp_path / "preferences")
    run = uuid.uuid4().hex[:6]
    name = f"rlhf-labeler-real-{run}"
    labeler = ray.remote(Labeler).options(name=name, num_cpus=0).remote(root, TextRankings(),
                                                                         "human")
    (qid,) = ray.get(labeler.submit.remote(["Amélie is a"], [texts]))
    url = _deploy_text_page(ray, name, root, run, serve_http, instruction)
    try:
        with sync_playwright() as p:
            browser, page = _open(p, url, qid)
            assert page.inner_text("#task") == instruction
            assert page.inner_text("#prompt") == "Amélie is a"
            shown = page.eval_on_selector_all("#ranklist li span:last-child",
                                              "xs => xs.map(x => x.textContent)")
            assert shown == texts
            browser.close()
    finally:
        from ray import serve

        serve.delete(f"label-{run}")
        ray.kill(labeler)
