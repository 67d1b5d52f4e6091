"""Test tiers by marker: unit (no Ray), integration and e2e (one local Ray cluster per session)."""

from __future__ import annotations

import os
import threading

import pytest

os.environ.setdefault("MUJOCO_GL", "egl")
# a metric key no workload registers fails the write (rlhf_ray.runtime.metrics); set before
# the session's Ray cluster starts, so every process of it (and every CLI run) inherits it
os.environ["RLHF_RAY_STRICT_METRICS"] = "1"


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = str(item.fspath)
        for tier in ("unit", "integration", "e2e"):
            if f"{os.sep}{tier}{os.sep}" in path:
                item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def s3():
    """A real S3-protocol server on 127.0.0.1 (moto's, in a thread of this process), pointed
    at through the environment as users point clients at MinIO or Ceph (`AWS_ENDPOINT_URL`):
    every process started after it -- the session's Ray workers, `rlhf-ray` subprocesses --
    reaches it. Yields a function making a fresh bucket: `s3("name") -> "s3://name-<n>"`."""
    import itertools
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true")
    counter = itertools.count()

    def bucket(name: str = "runs") -> str:
        import pyarrow.fs as pafs

        b = f"{name}-{next(counter)}"
        pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"],
                          allow_bucket_creation=True).create_dir(b)
        return f"s3://{b}"

    yield bucket
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3):
    """One real local Ray cluster (2 CPUs, token auth on) shared by the whole session; its
    workers see the session's S3 server (`s3`)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def hopper_segments(n: int, length: int, seed: int = 0):
    """n real Hopper-v5 segments (random policy) with the MuJoCo state of every step."""
    import numpy as np

    from rlhf_ray.control.envs import make_env
    from rlhf_ray.core.segments import cut_segments

    env = make_env({"id": "Hopper-v5", "kwargs": {"terminate_when_unhealthy": False}})
    layout = env.layout
    rng = np.random.default_rng(seed)
    env.action_space.seed(seed)
    obs, info = env.reset(seed=seed)
    t = 2 * n * length
    ep = {k: [] for k in ("obs", "actions", "true_rewards", "state_qpos", "state_qvel")}
    for _ in range(t):
        a = env.action_space.sample()
        ep["obs"].append(obs)
        ep["actions"].append(a)
        obs, r, _, _, info = env.step(a)
        ep["true_rewards"].append(r)
        state = layout.unpack(info["rlhf"][None])
        ep["state_qpos"].append(state["state_qpos"][0])
        ep["state_qvel"].append(state["state_qvel"][0])
    env.close()
    arrays = {k: np.asarray(v, dtype=np.float32 if k in ("obs", "actions", "true_rewards")
                            else np.float64) for k, v in ep.items()}
    return cut_segments(arrays, length, n, rng)


class Checked(threading.Thread):
    """A thread whose failure fails the test: `finish(timeout)` joins it, raises what it
    raised, and fails if it is still running at the deadline (a daemon, so a hung one never
    keeps the session alive)."""

    def __init__(self, target, *args):
        super().__init__(target=self._run, args=(target, *args), daemon=True)
        self.error: BaseException | None = None

    def _run(self, target, *args) -> None:
        try:
            target(*args)
        except BaseException as exc:  # noqa: BLE001 - raised again in the test's thread
            self.error = exc

    def finish(self, timeout: float) -> None:
        self.join(timeout=timeout)
        if self.error is not None:
            raise self.error
        assert not self.is_alive(), f"{self.name} still running after {timeout:.0f} s"


class Http:
    """A tiny JSON client for the labeling app (urllib: nothing beyond the standard library)."""

    def __init__(self, base: str, token: str | None):
        self.base, self.token = base.rstrip("/"), token

    def request(self, method: str, path: str, body=None, token="default", raw: bytes | None = None,
                headers: dict | None = None):
        import json
        import urllib.error
        import urllib.request

        token = self.token if token == "default" else token
        h = {"Content-Type": "application/json", **(headers or {})}
        if token:
            h["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                payload = r.read()
                ctype = r.headers.get("content-type", "")
                return r.status, (json.loads(payload) if "json" in ctype and payload else payload)
        except urllib.error.HTTPError as e:
            payload = e.read()
            try:
                return e.code, json.loads(payload)
            except ValueError:
                return e.code, payload


@pytest.fixture(scope="session")
def serve_http(ray_cluster):
    """Serve's HTTP proxy on the shared cluster: (host, port)."""
    from rlhf_ray.runtime.serving import ensure_serve_http

    return ensure_serve_http("127.0.0.1", 8000)


# what `rlhf-ray train` itself prints; anything else on the terminal is Ray's, RLlib's or
# Serve's, which belongs in the run folder's driver.log unless --verbose
OWN_LINES = ("run folder:", "labeling page:", "stage ", "reward model:", "resuming ",
             "iter ", "final:", "final policy:", "done:", "comparisons:", "warning: iteration")


def assert_own_lines_only(out, run_dir) -> None:
    """`out`: a finished `rlhf-ray train` (subprocess.run, text). Every line it printed is
    its own, and the run's driver.log holds what Ray, RLlib and Serve said."""
    import re

    lines = [x for x in (out.stdout + out.stderr).splitlines() if x.strip()]
    foreign = [x for x in lines if not x.startswith(OWN_LINES)]
    assert lines and not foreign, foreign[:5]
    from rlhf_ray.storage import locations

    log = locations.read_text(locations.join(locations.normalize(run_dir), "driver.log"))
    assert re.search(r"\b(INFO|WARNING)\b.*(worker\.py|serve)", log), log[-2000:]
