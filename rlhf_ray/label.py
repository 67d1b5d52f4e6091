"""Labeling a run from outside its training process: `rlhf-ray label RUN_DIR` serves the
pending queries of a stopped run, and `app_builder` is the labeling page as a Serve
application of its own (`serve deploy serve/labeling.yaml`, the RayService in k8s/).

Either workload: the run folder's config says which, and the workload says what its queries
are (`query_kind`) and what the page needs beside the labeler (`page_helpers`).
"""

from __future__ import annotations

import os
import sys
import time
import uuid

import ray

from rlhf_ray import workloads
from rlhf_ray.config import load_config
from rlhf_ray.errors import ConfigError
from rlhf_ray.feedback.app import LabelingApp
from rlhf_ray.feedback.loop import Feedback, start_labeler
from rlhf_ray.runtime.cluster import init_ray
from rlhf_ray.runtime.names import RoleNames
from rlhf_ray.runtime.run_dir import RunDir
from rlhf_ray.runtime.sections import RoleResources
from rlhf_ray.storage import locations


def label_run(run_dir: str, overrides: list[str] | None = None, exit_when_done: bool = False,
              poll_s: float = 2.0, on_url=None) -> int:
    """`rlhf-ray label RUN_DIR`: serve the pending queries of an existing (stopped) run."""
    path = locations.join(locations.normalize(run_dir), "config.yaml")
    if not locations.is_file(path):
        raise ConfigError(f"{run_dir}: not a run folder (no config.yaml)")
    cfg = load_config(path, ["labeler.source=human", *(overrides or [])])
    workload = workloads.of(cfg)
    started = init_ray(cfg)
    feedback = Feedback(cfg, RunDir(cfg, run_dir), RoleNames("label-" + uuid.uuid4().hex[:6], cfg.workload),
                        kind=workload.query_kind(cfg), page_helpers=workload.page_helpers)
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
    """Serve application builder: the labeling page for a run folder, on its own.

    args: `run_dir` (a run folder on storage every node sees), `token_env` (the name of an
    environment variable holding the access token, e.g. from a Kubernetes Secret; default
    RLHF_LABEL_TOKEN) or `token`, optional `num_replicas`. Starts, if not already running, a
    detached labeler actor on the run's store (it owns every write) and what the page needs
    beside it (clip renderers, for control runs); the app itself holds no state.
    """
    run_dir = args.get("run_dir")
    config = locations.join(locations.normalize(run_dir), "config.yaml") if run_dir else None
    if not config or not locations.is_file(config):
        raise ValueError(f"labeling app: args.run_dir={run_dir!r} is not a run folder "
                         "(no config.yaml)")
    token = args.get("token") or os.environ.get(args.get("token_env", "RLHF_LABEL_TOKEN"), "")
    if len(token) < 16:
        raise ValueError("labeling app: set a token of 16+ characters (args.token_env names "
                         "the environment variable holding it)")
    cfg = load_config(config, ["labeler.source=human"])
    workload = workloads.of(cfg)
    store_root = RunDir(cfg, run_dir).store_root
    names = RoleNames("served-" + locations.name(locations.normalize(run_dir)), cfg.workload)
    namespace = "rlhf-labeling"
    detached = {"namespace": namespace, "lifetime": "detached", "get_if_exists": True}
    start_labeler(cfg, workload.query_kind(cfg), store_root, "human", name=names.labeler,
                  res=RoleResources(), **detached)
    if workload.page_helpers is not None:
        workload.page_helpers(cfg, names, namespace, store_root, nice=0, **detached)
    return LabelingApp.options(num_replicas=int(args.get("num_replicas", 1)),
                               ray_actor_options={"num_cpus": 0}).bind(
        names.labeler, namespace, store_root, token, cfg.labeler.instruction, names.label_app)
