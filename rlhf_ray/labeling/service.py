"""Starting and stopping what humans need: clip renderers and the labeling app.

Used by the training controller (`labeler.source=human|mixed`) and by `rlhf-ray label RUN_DIR`,
which labels the pending queries of an existing run on their own.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from rlhf_ray.config import Config, LLMConfig


@dataclass
class LabelingRoles:
    app_name: str
    url: str
    token: str
    renderers: list = field(default_factory=list)


def ensure_serve_http(host: str, port: int) -> tuple[str, int]:
    """Start Serve's HTTP proxy on host:port unless Serve already runs; returns where the
    proxy really listens."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    try:
        from ray.serve.context import _get_global_client

        opts = _get_global_client().http_config
        return opts.host, int(opts.port)
    except Exception:  # noqa: BLE001 - older/newer Serve internals: report what we asked for
        return host, port


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


def start_labeling(cfg: Config | LLMConfig, *, labeler_name: str, namespace: str, store_root: str,
                   run_id: str) -> LabelingRoles:
    from rlhf_ray.labeling import app as labeling_app
    from rlhf_ray.labeling.app import new_token

    lab = cfg.labeler
    token = lab.token or new_token()
    host, port = ensure_serve_http(lab.host, lab.port)
    renderers = []
    if cfg.workload == "control":  # clips to render; the LLM workload shows text only
        renderers = _start_renderers(cfg, labeler_name, namespace, store_root, run_id)
    app_res = cfg.placement.labeling_app
    app_name = f"rlhf-label-{run_id}"
    labeling_app.deploy(labeler_name=labeler_name, namespace=namespace, store_root=store_root,
                        token=token, app_name=app_name, route_prefix=lab.route_prefix,
                        num_cpus=app_res.num_cpus, resources_=app_res.resources)
    return LabelingRoles(app_name, public_url(host, port, lab.route_prefix, token), token,
                         renderers)


def _start_renderers(cfg: Config, labeler_name: str, namespace: str, store_root: str,
                     run_id: str, nice: int | None = None,
                     actor_opts: dict | None = None) -> list:
    """`labeler.clip_renderers` clip renderers for the labeler; `nice`: their niceness
    (default `placement.batch_nice`); `actor_opts`: extra Ray actor options (namespace,
    lifetime, get_if_exists for the served app's detached ones)."""
    import ray

    from rlhf_ray.labeling.clips import ClipRenderWorker

    lab = cfg.labeler
    renderers = []
    res = cfg.placement.clip_renderer
    env_cfg = cfg.env.model_dump(mode="json")
    nice = cfg.placement.batch_nice if nice is None else nice
    for i in range(lab.clip_renderers):
        opts = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus,
                "runtime_env": {"env_vars": {"MUJOCO_GL": "egl"}},
                "name": f"rlhf-render-{run_id}-{i}", **(actor_opts or {})}
        if res.resources:
            opts["resources"] = dict(res.resources)
        renderers.append(ray.remote(ClipRenderWorker).options(**opts).remote(
            labeler_name, namespace, store_root, env_cfg, lab.clips.width, lab.clips.height,
            lab.clips.fps, lab.clips.frame_skip, lab.clips.shadows, nice))
    return renderers


def stop_labeling(roles: LabelingRoles | None) -> None:
    import ray
    from ray import serve

    if roles is None:
        return
    try:
        serve.delete(roles.app_name)
    except Exception:  # noqa: BLE001 - best effort at shutdown
        pass
    for r in roles.renderers:
        try:
            ray.kill(r)
        except Exception:  # noqa: BLE001
            pass


def run_store_root(run_dir: str, cfg: Config) -> str:
    from pathlib import Path

    storage = cfg.run.storage_path
    if "://" in storage:
        return f"{storage.rstrip('/')}/{Path(run_dir).name}/preferences"
    return str(Path(run_dir) / "preferences")


def label_run(run_dir: str, overrides: list[str] | None = None, exit_when_done: bool = False,
              poll_s: float = 2.0, on_url=None) -> int:
    """`rlhf-ray label RUN_DIR`: serve the pending queries of an existing (stopped) run."""
    import sys
    import time
    import uuid
    from pathlib import Path

    import ray

    from rlhf_ray.config import ConfigError, load_config
    from rlhf_ray.roles import init_ray
    from rlhf_ray.roles import remote_role as _remote
    from rlhf_ray.labeler import Labeler

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a run folder (no config.yaml)")
    cfg = load_config(str(path), ["labeler.source=human", *(overrides or [])])
    store_root = run_store_root(run_dir, cfg)
    started = init_ray(cfg)
    run_id = "label-" + uuid.uuid4().hex[:6]
    name = f"rlhf-labeler-{run_id}"
    ns = ray.get_runtime_context().namespace
    if cfg.workload == "llm":  # the oracle is a text scorer
        oracle, text_oracle = None, cfg.labeler.oracle
    else:
        oracle, text_oracle = cfg.labeler.oracle.model_dump(), cfg.labeler.text_oracle
    labeler = _remote(Labeler, cfg.placement.labeler, name=name).remote(
        store_root, "human", oracle, cfg.seed, cfg.labels.budget,
        cfg.labeler.lease_s, cfg.labeler.deadline_s, text_oracle)
    roles = None
    try:
        stats = ray.get(labeler.stats.remote())
        roles = start_labeling(cfg, labeler_name=name, namespace=ns, store_root=store_root,
                               run_id=run_id)
        print(f"labeling page: {roles.url}", flush=True)
        if on_url is not None:
            on_url(roles.url)
        print(f"{stats['labels_pending']} queries pending, {stats['labels_total']} answered",
              flush=True)
        last = None
        while True:
            stats = ray.get(labeler.stats.remote())
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
        stop_labeling(roles)
        ray.kill(labeler)
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
    from pathlib import Path

    import ray

    from rlhf_ray.config import load_config
    from rlhf_ray.labeler import RESTART, Labeler
    from rlhf_ray.labeling.app import LabelingApp

    run_dir = args.get("run_dir")
    if not run_dir or not (Path(run_dir) / "config.yaml").is_file():
        raise ValueError(f"labeling app: args.run_dir={run_dir!r} is not a run folder "
                         "(no config.yaml)")
    token = args.get("token") or os.environ.get(args.get("token_env", "RLHF_LABEL_TOKEN"), "")
    if len(token) < 16:
        raise ValueError("labeling app: set a token of 16+ characters (args.token_env names "
                         "the environment variable holding it)")
    cfg = load_config(str(Path(run_dir) / "config.yaml"), ["labeler.source=human"])
    store_root = run_store_root(run_dir, cfg)
    key = "served-" + Path(run_dir).resolve().name
    name, namespace = f"rlhf-labeler-{key}", "rlhf-labeling"
    if cfg.workload == "llm":
        oracle, text_oracle = None, cfg.labeler.oracle
    else:
        oracle, text_oracle = cfg.labeler.oracle.model_dump(), cfg.labeler.text_oracle
    ray.remote(Labeler).options(name=name, namespace=namespace, lifetime="detached",
                                get_if_exists=True, num_cpus=0, **RESTART).remote(
        store_root, "human", oracle, cfg.seed, cfg.labels.budget, cfg.labeler.lease_s,
        cfg.labeler.deadline_s, text_oracle)
    if cfg.workload == "control":
        _start_renderers(cfg, name, namespace, store_root, key, nice=0, actor_opts={
            "namespace": namespace, "lifetime": "detached", "get_if_exists": True})
    return LabelingApp.options(num_replicas=int(args.get("num_replicas", 1)),
                               ray_actor_options={"num_cpus": 0}).bind(
        name, namespace, store_root, token)

