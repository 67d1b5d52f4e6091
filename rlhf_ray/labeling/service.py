"""Starting and stopping what humans need: clip renderers and the labeling app.

Used by the training controller (`labeler.source=human|mixed`) and by `rlhf-ray label RUN_DIR`,
which labels the pending queries of an existing run on their own.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field

from rlhf_ray.config import Config, LLMConfig
from rlhf_ray.roles import RoleNames, delete_app, ensure_serve_http, kill_all, remote_role


@dataclass
class LabelingRoles:
    app_name: str
    url: str
    token: str
    renderers: list = field(default_factory=list)


def public_url(host: str, port: int, route_prefix: str, token: str) -> str:
    shown = host
    if host in ("0.0.0.0", "::"):
        try:
            import ray

            shown = ray.util.get_node_ip_address()
        except Exception:  # noqa: BLE001
            shown = socket.gethostname()
    prefix = route_prefix.rstrip("/")
    return f"http://{shown}:{port}{prefix}/?token={token}"


def route_prefix(cfg: Config | LLMConfig, run_name: str) -> str:
    """`labeler.route_prefix`, else `/label/<run name>` (characters a URL path keeps)."""
    if cfg.labeler.route_prefix:
        return cfg.labeler.route_prefix
    return "/label/" + (re.sub(r"[^A-Za-z0-9_.-]", "-", run_name) or "run")


def check_page(url: str, token: str, app_name: str, timeout_s: float = 60.0) -> None:
    """Raise unless `url` reaches the labeling app `app_name` with `token` (its status
    route names the app): a page that lands on another run's app is never printed."""
    import json
    import time
    import urllib.error
    import urllib.request

    status_url = url.split("?", 1)[0] + "api/status"
    deadline, why = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        req = urllib.request.Request(status_url, headers={"X-Token": token})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                app = json.loads(resp.read() or b"{}").get("app")
            if app == app_name:
                return
            why = f"it is the page of {app!r}"
        except urllib.error.HTTPError as exc:
            why = f"HTTP {exc.code}"  # 404 while the route is not up yet, 401: another app
        except OSError as exc:
            why = str(getattr(exc, "reason", exc))
        time.sleep(0.5)
    raise RuntimeError(f"labeling page {url.split('?', 1)[0]} does not reach this run's app "
                       f"({why})")


def start_labeling(cfg: Config | LLMConfig, names: RoleNames, namespace: str,
                   store_root: str, run_name: str) -> LabelingRoles:
    """The labeling page for the labeler `names.labeler` (and, for clips, its renderers) at
    `route_prefix(cfg, run_name)`; returns once the printed URL is checked to reach it."""
    from rlhf_ray.labeling import app as labeling_app
    from rlhf_ray.labeling.app import new_token
    from rlhf_ray.roles import wait_running

    lab = cfg.labeler
    token = lab.token or new_token()
    host, port = ensure_serve_http(lab.host, lab.port)
    prefix = route_prefix(cfg, run_name)
    renderers = []
    if cfg.workload == "control":  # clips to render; the LLM workload shows text only
        renderers = _start_renderers(cfg, names, namespace, store_root)
    labeling_app.deploy(labeler_name=names.labeler, namespace=namespace, store_root=store_root,
                        token=token, app_name=names.label_app, route_prefix=prefix,
                        res=cfg.placement.labeling_app,
                        instruction=getattr(lab, "instruction", ""))
    roles = LabelingRoles(names.label_app, public_url(host, port, prefix, token), token, renderers)
    try:
        wait_running(names.label_app)
        check_page(roles.url, token, names.label_app)
    except BaseException:
        stop_labeling(roles)
        raise
    return roles


def _start_renderers(cfg: Config, names: RoleNames, labeler_ns: str, store_root: str,
                     nice: int | None = None, **actor_opts) -> list:
    """`labeler.clip_renderers` clip renderers for the labeler; `nice`: their niceness
    (default `placement.batch_nice`); `actor_opts`: more Ray actor options (namespace,
    lifetime, get_if_exists for the served app's detached ones)."""
    from rlhf_ray.labeling.clips import ClipRenderWorker

    lab = cfg.labeler
    nice = cfg.placement.batch_nice if nice is None else nice
    return [remote_role(ClipRenderWorker, cfg.placement.clip_renderer, nice=nice,
                        name=names.renderer(i), runtime_env={"env_vars": {"MUJOCO_GL": "egl"}},
                        **actor_opts).remote(
        names.labeler, labeler_ns, store_root, cfg.env.model_dump(mode="json"), lab.clips.width,
        lab.clips.height, lab.clips.fps, lab.clips.frame_skip, lab.clips.shadows)
        for i in range(lab.clip_renderers)]


def stop_labeling(roles: LabelingRoles | None) -> None:
    if roles is None:
        return
    delete_app(roles.app_name)
    kill_all(roles.renderers)


def label_run(run_dir: str, overrides: list[str] | None = None, exit_when_done: bool = False,
              poll_s: float = 2.0, on_url=None) -> int:
    """`rlhf-ray label RUN_DIR`: serve the pending queries of an existing (stopped) run."""
    import sys
    import time
    import uuid

    import ray

    from rlhf_ray.config import ConfigError, load_config
    from rlhf_ray.feedback import Feedback
    from rlhf_ray.roles import init_ray
    from rlhf_ray.run_dir import RunDir

    from rlhf_ray import storage

    path = storage.join(storage.normalize(run_dir), "config.yaml")
    if not storage.is_file(path):
        raise ConfigError(f"{run_dir}: not a run folder (no config.yaml)")
    cfg = load_config(path, ["labeler.source=human", *(overrides or [])])
    started = init_ray(cfg)
    feedback = Feedback(cfg, RunDir(cfg, run_dir), RoleNames("label-" + uuid.uuid4().hex[:6]),
                        kind="clip" if cfg.workload == "control" else "text")
    try:
        feedback.start(url_file=False)
        if on_url is not None:
            on_url(feedback.labeling.url)
        stats = ray.get(feedback.labeler.stats.remote())
        print(f"{stats['labels_pending']} queries pending, {stats['labels_total']} answered",
              flush=True)
        last = None
        while True:
            stats = ray.get(feedback.labeler.stats.remote())
            now = (stats["labels_total"], stats["labels_pending"])
            if now != last:
                print(f"answered {now[0]}, pending {now[1]}", flush=True)
                last = now
            if exit_when_done and stats["labels_pending"] == 0:
                return 0
            time.sleep(poll_s)
    except KeyboardInterrupt:
        print("stopped; every acknowledged label is in the store", file=sys.stderr)
        return 0
    finally:
        feedback.stop()
        if started:
            ray.shutdown()


def app_builder(args: dict):
    """Serve application builder: the labeling page for a run folder, on its own
    (`serve deploy serve/labeling.yaml`, or the RayService in k8s/).

    args: `run_dir` (a run folder on storage every node sees), `token_env` (the name of an
    environment variable holding the access token, e.g. from a Kubernetes Secret; default
    RLHF_LABEL_TOKEN) or `token`, optional `num_replicas`. Starts, if not already running, a
    detached labeler actor on the run's store (it owns every write) and, for control runs,
    clip renderers; the app itself holds no state.
    """
    import os

    from rlhf_ray.config import RoleResources, load_config
    from rlhf_ray.feedback import labeler_args
    from rlhf_ray.labeler import RESTART, Labeler
    from rlhf_ray.labeling.app import LabelingApp
    from rlhf_ray.run_dir import RunDir

    from rlhf_ray import storage

    run_dir = args.get("run_dir")
    if not run_dir or not storage.is_file(storage.join(storage.normalize(run_dir), "config.yaml")):
        raise ValueError(f"labeling app: args.run_dir={run_dir!r} is not a run folder "
                         "(no config.yaml)")
    token = args.get("token") or os.environ.get(args.get("token_env", "RLHF_LABEL_TOKEN"), "")
    if len(token) < 16:
        raise ValueError("labeling app: set a token of 16+ characters (args.token_env names "
                         "the environment variable holding it)")
    cfg = load_config(storage.join(storage.normalize(run_dir), "config.yaml"),
                      ["labeler.source=human"])
    store_root = RunDir(cfg, run_dir).store_root
    names, namespace = RoleNames("served-" + storage.name(storage.normalize(run_dir))), "rlhf-labeling"
    detached = {"namespace": namespace, "lifetime": "detached", "get_if_exists": True}
    remote_role(Labeler, RoleResources(), name=names.labeler, **detached, **RESTART).remote(
        *labeler_args(cfg, store_root, "human"))
    if cfg.workload == "control":
        _start_renderers(cfg, names, namespace, store_root, nice=0, **detached)
    return LabelingApp.options(num_replicas=int(args.get("num_replicas", 1)),
                               ray_actor_options={"num_cpus": 0}).bind(
        names.labeler, namespace, store_root, token, getattr(cfg.labeler, "instruction", ""),
        names.label_app)
