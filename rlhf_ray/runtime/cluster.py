"""Ray clusters: a run joins the running cluster or starts a local one (`init_ray`); and a
multi-node Ray cluster on one machine, for trying placement (`rlhf-ray cluster up`).

Each node is its own raylet (`ray.cluster_utils.Cluster`) with its own CPUs and custom
resources, so a config's `placement:` section behaves as on a real cluster: a role asking for
`{rollout: 1}` can only land on a node that has `rollout`. The head runs the dashboard, so
`ray job submit --address http://127.0.0.1:DASHBOARD_PORT` works against it.

    rlhf-ray cluster up --head cpus=1,head=1 --node cpus=2,rollout=1,learner=1 \
        --node cpus=1,serving=1
    # prints RAY_ADDRESS and the dashboard URL; Ctrl-C stops every node it started;
    # kill -USR1 <pid> removes the newest worker node (a lost machine)

The cluster keeps its files under its own temp dir (default: a fresh /tmp/rlhfc-*), so the
machine's default Ray cluster, if any, is never touched.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path


def init_ray(cfg) -> bool:
    """Join the running cluster when there is one; start a local one otherwise.
    Returns True when this call started Ray (and so should stop it)."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
        return False
    ray.init(num_cpus=cfg.run.ray_num_cpus, log_to_driver=False, include_dashboard=False)
    return True


def parse_node(spec: str) -> dict:
    """`cpus=2,gpus=0,rollout=1` -> {"num_cpus": 2, "num_gpus": 0, "resources": {"rollout": 1}}."""
    out: dict = {"num_cpus": 1, "num_gpus": 0, "resources": {}}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, value = item.partition("=")
        try:
            num = float(value)
        except ValueError:
            num = None
        if not sep or num is None or num < 0:
            raise ValueError(f"node spec {spec!r}: {item!r} is not name=number (>= 0)")
        if key == "cpus":
            out["num_cpus"] = int(num)
        elif key == "gpus":
            out["num_gpus"] = int(num)
        else:
            out["resources"][key] = num
    return out


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def up(head: str, nodes: list[str], temp_dir: str | None = None, port: int | None = None,
       dashboard_port: int | None = None, info_file: str | None = None,
       ready: threading.Event | None = None, stop: threading.Event | None = None) -> dict:
    """Start the head and the nodes, write the info file, block until `stop` (or SIGINT /
    SIGTERM), then shut down every node started here."""
    head_spec, node_specs = parse_node(head), [parse_node(n) for n in nodes]
    temp_dir = temp_dir or tempfile.mkdtemp(prefix="rlhfc-", dir="/tmp")
    # Ray writes "the current cluster" under its temp root: keep ours out of /tmp/ray
    os.environ["RAY_TMPDIR"] = temp_dir
    os.makedirs(os.path.join(temp_dir, "ray"), exist_ok=True)
    from ray.cluster_utils import Cluster

    port = port or free_port()
    dashboard_port = dashboard_port or free_port()

    cluster = Cluster(initialize_head=True, shutdown_at_exit=True, head_node_args={
        **head_spec, "gcs_server_port": port, "temp_dir": temp_dir, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port,
        # every node's agent on a free port: another cluster on this machine holds Ray's
        # default (52365), and the head's agent is the one `ray job submit` needs
        "dashboard_agent_listen_port": free_port(),
        "object_store_memory": 256 * 1024 * 1024})
    # A job's entrypoint joins the cluster named in <temp dir>/ray_current_cluster; Ray's
    # helper writes it elsewhere, and without it the job supervisor falls back to any GCS
    # process on the machine: with a second cluster here, jobs ran on that one (measured)
    Path(temp_dir, "ray_current_cluster").write_text(cluster.address)
    started = [cluster.head_node]
    removed: list = []
    try:
        for i, spec in enumerate(node_specs, 1):
            # nodes on one machine share the session folder: each unpacks job working dirs
            # in its own, or one node's clean-up deletes the files another node's job runs in
            started.append(cluster.add_node(**spec, object_store_memory=200 * 1024 * 1024,
                                            dashboard_agent_listen_port=free_port(),
                                            runtime_env_dir_name=f"runtime_resources_node{i}"))
        cluster.wait_for_nodes()
        info = {"address": cluster.address, "dashboard": f"http://127.0.0.1:{dashboard_port}",
                "temp_dir": temp_dir, "pid": os.getpid(),
                "nodes": [{"node_id": n.node_id, **s} for n, s in zip(started, [head_spec, *node_specs])]}
        _write(info_file, info)
        print(f"RAY_ADDRESS={info['address']}\ndashboard / jobs: {info['dashboard']}\n"
              f"{len(started)} nodes: " + "; ".join(
                  f"{n['num_cpus']} CPU {n['resources'] or ''}" for n in info["nodes"])
              + "\nCtrl-C stops them.", flush=True)
        stop = stop or threading.Event()
        remove = threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
            # SIGUSR1 takes the newest worker node away (its raylet killed, as a machine
            # lost): for trying what a run does when a node disappears
            signal.signal(signal.SIGUSR1, lambda *_: remove.set())
        if ready is not None:
            ready.set()
        while not stop.wait(0.2):
            if remove.is_set():
                remove.clear()
                workers = [n for n in started[1:] if n not in removed]
                if workers:
                    node = workers[-1]
                    cluster.remove_node(node, allow_graceful=False)
                    removed.append(node)
                    info["removed"] = [n.node_id for n in removed]
                    _write(info_file, info)
                    print(f"removed node {node.node_id}", flush=True)
        return info
    finally:
        cluster.shutdown()


def _write(path: str | None, info: dict) -> None:
    if path:  # whole or not at all: readers poll this file
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, path)


def main(args) -> int:
    if args.node is None:
        args.node = ["cpus=2,rollout=1,learner=1", "cpus=1,serving=1"]
    try:
        up(args.head, args.node, args.temp_dir, args.port, args.dashboard_port, args.info)
    except ValueError as exc:
        print(f"rlhf-ray: {exc}", file=sys.stderr)
        return 2
    return 0
