"""The reward-model Serve deployment on the session's real local Ray cluster."""

import json
import urllib.request
import uuid

import numpy as np
import pytest
import torch

from rlhf_ray.control.reward import RewardEnsemble, RewardNetSpec
from rlhf_ray.control.serve import deploy
from rlhf_ray.runtime.sections import RewardServeConfig
from rlhf_ray.storage.weights import WeightStore

SPEC = RewardNetSpec(net="mlp", obs_shape=(5,), act_dim=2, hidden=(16,), ensemble_size=3)


def constant_weights(value: float) -> dict:
    ens = RewardEnsemble(SPEC)
    with torch.no_grad():
        for p in ens.parameters():
            p.zero_()
        for m in ens.members:
            m.body[-1].bias.fill_(value)
    return {k: v.numpy() for k, v in ens.flat_state().items()}


@pytest.fixture(scope="module")
def served(ray_cluster, serve_http):
    ray = ray_cluster
    name = f"ws-{uuid.uuid4().hex[:6]}"
    store = ray.remote(WeightStore).options(name=name, num_cpus=0).remote()
    app = f"rm-test-{uuid.uuid4().hex[:6]}"
    cfg = RewardServeConfig(num_cpus=0.25, max_batch_size=16, batch_wait_timeout_s=0.05)
    handle = deploy(SPEC, app_name=app, weight_store=name,
                    namespace=ray.get_runtime_context().namespace, serve_cfg=cfg)
    yield ray, store, handle, app, serve_http
    from ray import serve

    serve.delete(app)
    ray.kill(store)


def test_concurrent_callers_are_batched(served):
    handle = served[2]
    rng = np.random.default_rng(0)
    reqs = [(rng.normal(size=(n, 5)).astype(np.float32), rng.normal(size=(n, 2)).astype(np.float32))
            for n in range(1, 33)]
    responses = [handle.score.remote(o, a) for o, a in reqs]
    results = [r.result() for r in responses]
    for (o, _), res in zip(reqs, results):  # each caller gets its own rows back
        assert res["reward"].shape == (len(o),) and res["members"].shape == (3, len(o))
    sizes = handle.info.remote().result()["batch_sizes"]
    assert max(sizes) > 1, f"no batching happened: {sizes}"
    assert sum(sizes) >= 32


def test_weight_swap_changes_scores_without_restart(served):
    ray, store, handle = served[:3]
    obs, act = np.ones((4, 5), np.float32), np.zeros((4, 2), np.float32)
    before = handle.score.remote(obs, act).result()
    pid = handle.info.remote().result()["pid"]
    ray.get(store.publish.remote(7, constant_weights(2.5)))
    after = handle.score.remote(obs, act).result()
    assert after["version"] == 7 and before["version"] != 7
    assert np.allclose(after["reward"], 2.5) and not np.allclose(before["reward"], 2.5)
    assert handle.info.remote().result()["pid"] == pid  # the same replica process
    # a stale publish never goes backwards
    assert ray.get(store.publish.remote(3, constant_weights(0.0))) == 7
    assert handle.score.remote(obs, act).result()["version"] == 7


def test_http_score_and_bad_request(served):
    app, (host, port) = served[3:]

    def post(body: bytes):
        req = urllib.request.Request(f"http://{host}:{port}/{app}", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    status, body = post(json.dumps({"obs": [[0.0] * 5] * 3, "actions": [[0.0, 0.0]] * 3}).encode())
    assert status == 200 and len(body["reward"]) == 3
    status, body = post(json.dumps({"obs": [[0.0] * 4], "actions": [[0.0, 0.0]]}).encode())
    assert status == 422 and "shape" in body["error"]
    status, _ = post(b"{not json")
    assert status == 422
    status, body = post(json.dumps({"obs": [[0.0] * 5], "actions": [[0.0, 0.0]],
                                    "version": 10_000}).encode())
    assert status == 409 and "not published" in body["error"]


def test_serve_config_validates_and_builds_from_a_checkpoint(served, tmp_path):
    import yaml
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from rlhf_ray.control.reward import save_weights
    from rlhf_ray.control.serve import app_builder

    conf = yaml.safe_load(open("serve/reward_model.yaml"))
    ServeDeploySchema.model_validate(conf)  # Serve's own schema
    path = str(tmp_path / "rm.safetensors")
    save_weights(path, {k: torch.as_tensor(v) for k, v in constant_weights(-1.5).items()}, SPEC, 11)
    # the file's autoscaling settings, starting at 2 replicas (a fixed deployment has 1)
    args = dict(conf["applications"][0]["args"], weights=path, num_cpus=0.25)
    assert args["autoscaling"]["max_replicas"] > 1 and "num_replicas" not in args
    args["autoscaling"] = dict(args["autoscaling"], min_replicas=1, max_replicas=2,
                               initial_replicas=2)
    handle = serve.run(app_builder(args), name="rm-from-ckpt", route_prefix="/rm-from-ckpt")
    try:
        res = handle.score.remote(np.zeros((3, 5), np.float32), np.zeros((3, 2), np.float32)).result()
        assert res["version"] == 11 and np.allclose(res["reward"], -1.5)
        deps = serve.status().applications["rm-from-ckpt"].deployments
        assert [d.replica_states.get("RUNNING") for d in deps.values()] == [2]
    finally:
        serve.delete("rm-from-ckpt")
    # bad settings: one line naming the key, before anything is deployed
    for bad, match in (({"min_replicas": 3, "max_replicas": 2}, "args.autoscaling: .*min_replicas 3"),
                       ({"max_replicas": 0}, "args.autoscaling.max_replicas: "),
                       ({"max_replica": 2}, "args.autoscaling.max_replica: ")):
        with pytest.raises(ValueError, match=match) as err:
            app_builder(dict(args, autoscaling=bad))
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="num_replicas or args.autoscaling, not both"):
        app_builder(dict(args, num_replicas=2))


def test_overload_is_refused_with_503_not_queued_without_bound(ray_cluster, serve_http):
    """Past its queue limit the deployment answers 503 at once (back-pressure); what it
    accepted it answers. Queue limits come from placement.reward_model."""
    import threading
    from collections import Counter

    from ray import serve

    ray = ray_cluster
    host, port = serve_http  # where this cluster's proxy listens (8000 unless taken)
    name = f"ws-{uuid.uuid4().hex[:6]}"
    store = ray.remote(WeightStore).options(name=name, num_cpus=0).remote()
    app = f"rm-busy-{uuid.uuid4().hex[:6]}"
    cfg = RewardServeConfig(num_cpus=0.25, max_batch_size=1, batch_wait_timeout_s=0.0,
                            max_ongoing_requests=1, max_queued_requests=2)
    deploy(SPEC, app_name=app, weight_store=name, namespace=ray.get_runtime_context().namespace,
           serve_cfg=cfg)
    rows = 20000  # each request takes a while to parse and score
    body = json.dumps({"obs": [[0.1] * 5] * rows, "actions": [[0.0, 0.0]] * rows}).encode()
    codes: Counter = Counter()

    def post():
        req = urllib.request.Request(f"http://{host}:{port}/{app}", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                codes[r.status] += 1
        except urllib.error.HTTPError as e:
            codes[e.code] += 1

    try:
        threads = [threading.Thread(target=post) for _ in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
    finally:
        serve.delete(app)
        ray.kill(store)
    assert set(codes) <= {200, 503}, codes
    assert codes[503] > 0 and codes[200] > 0, codes
    assert sum(codes.values()) == 24


def test_a_deployment_started_without_waiting_reports_its_failure(ray_cluster):
    """`serving.run_app(..., wait=False)` returns at once; `serving.wait_running` then raises with
    Serve's own message when the replica cannot start (here: its constructor raises)."""
    from ray import serve

    from rlhf_ray.runtime.serving import run_app, wait_running

    @serve.deployment(name="Broken")
    class Broken:
        def __init__(self):
            raise ValueError("broken on purpose")

    name = f"rlhf-test-broken-{uuid.uuid4().hex[:6]}"
    run_app(Broken.bind(), name, f"/{name}", wait=False)
    try:
        with pytest.raises(RuntimeError, match=f"{name}: .*DEPLOY_FAILED.*broken on purpose"):
            wait_running(name, timeout_s=120)
    finally:
        serve.delete(name)


def test_two_replicas_pinned_calls_never_mix_versions_while_weights_swap(ray_cluster):
    """Two replicas, versions published every 50 ms while relabelling-sized calls
    of 16 requests each run: every call is pinned to the version published when it starts,
    and each of its scores is that version's (a constant reward per version here). A call
    pinned to a version both replicas have moved past is scored with the kept weights."""
    import threading

    from ray import serve

    from rlhf_ray.control.serve import score_chunks
    from rlhf_ray.runtime.scoring import pinned_version
    from rlhf_ray.runtime.sections import AutoscalingSettings

    ray = ray_cluster
    name, app = f"ws-{uuid.uuid4().hex[:6]}", f"rm-two-{uuid.uuid4().hex[:6]}"
    store = ray.remote(WeightStore).options(name=name, num_cpus=0).remote(8)
    ray.get(store.publish.remote(1, constant_weights(1.0)))
    cfg = RewardServeConfig(num_cpus=0, max_batch_size=4, batch_wait_timeout_s=0.002,
                            autoscaling=AutoscalingSettings(min_replicas=2, max_replicas=2))
    handle = deploy(SPEC, app_name=app, weight_store=name,
                    namespace=ray.get_runtime_context().namespace, serve_cfg=cfg)
    try:
        obs, act = np.ones((256, 5), np.float32), np.zeros((256, 2), np.float32)
        pids = {handle.info.remote().result()["pid"] for _ in range(40)}
        assert len(pids) == 2, pids  # both replicas answer
        stop, published = threading.Event(), [1]

        def publisher():
            while not stop.is_set() and published[-1] < 200:
                v = published[-1] + 1
                ray.get(store.publish.remote(v, constant_weights(float(v))))
                published.append(v)
                stop.wait(0.05)  # a real reward trainer publishes every few seconds at most

        th = threading.Thread(target=publisher, daemon=True)
        th.start()
        calls = []
        try:
            for _ in range(30):
                pin = pinned_version(store)
                results = score_chunks(handle, obs, act, chunk=16, version=pin)
                calls.append((pin, results))
        finally:
            stop.set()
            th.join(timeout=30)
        assert len(published) > 10  # weights really changed under the calls
        assert len({pin for pin, _ in calls}) > 5
        for pin, results in calls:
            assert len(results) == 16
            assert {r["version"] for r in results} == {pin}
            assert all(np.allclose(r["reward"], float(pin)) for r in results), pin
        # a version both replicas have moved past: scored with its kept weights
        newest = published[-1]
        for _ in range(4):  # every replica sees the newest version first
            score_chunks(handle, obs, act, chunk=16)
        old = score_chunks(handle, obs, act, chunk=16, version=newest - 2)
        assert {r["version"] for r in old} == {newest - 2}
        assert all(np.allclose(r["reward"], float(newest - 2)) for r in old)
        info = {}
        for _ in range(40):
            i = handle.info.remote().result()
            info[i["pid"]] = i
        assert sum(i["pinned_old"] for i in info.values()) >= 16
        assert {i["version"] for i in info.values()} == {newest}  # and they stay on the newest
        # a version no longer kept is refused in one line, not scored with other weights
        with pytest.raises(Exception, match="no longer kept"):
            handle.score.remote(obs[:2], act[:2], 1).result()
    finally:
        serve.delete(app)
        ray.kill(store)
