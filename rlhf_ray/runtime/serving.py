"""Serve helpers both workloads use: replica and deployment options from a role's config
section, Serve's HTTP proxy on a port of this cluster's own, starting an application and
waiting for it, listing and deleting applications."""

from __future__ import annotations

import socket
import time

from rlhf_ray.runtime import console
from rlhf_ray.runtime.actors import actor_options
from rlhf_ray.runtime.cluster import free_port


def replica_options(autoscaling, num_replicas: int) -> dict:
    """Serve's replicas: `autoscaling_config` from `AutoscalingSettings`, or a fixed number."""
    if autoscaling is not None:
        return {"autoscaling_config": autoscaling.model_dump(exclude_none=True)}
    return {"num_replicas": num_replicas}


def deployment_options(serve_cfg) -> dict:
    """`serve.deployment(...).options(...)` from `placement.reward_model`."""
    return {**replica_options(getattr(serve_cfg, "autoscaling", None), serve_cfg.num_replicas),
            "max_ongoing_requests": serve_cfg.max_ongoing_requests,
            "max_queued_requests": serve_cfg.max_queued_requests,
            "ray_actor_options": actor_options(serve_cfg)}


def _serve_running() -> bool:
    """Whether this Ray cluster already runs Serve (its controller actor exists)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return True
    except ValueError:
        return False


def port_free(host: str, port: int) -> bool:
    """Whether host:port can be bound here. Another cluster's Serve proxy holding it shows as
    taken (its socket listens; binding beside it needs SO_REUSEPORT, which this check does not set)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


def ensure_serve_http(host: str = "127.0.0.1", port: int = 8000) -> tuple[str, int]:
    """Start Serve's HTTP proxy on host:port unless Serve already runs on this cluster;
    returns where the proxy really listens. When this cluster starts Serve and the port is
    taken -- by another local cluster's proxy, which would otherwise answer this cluster's
    URLs (two proxies share a port through SO_REUSEPORT) -- a free port is taken instead."""
    from ray import serve

    if not _serve_running() and not port_free(host, port):
        free = free_port(host)
        console.note(f"port {port} on {host} is taken (another Ray cluster's Serve?): "
                     f"this cluster's Serve listens on {free}")
        port = free
    serve.start(http_options={"host": host, "port": port})
    try:
        from ray.serve.context import _get_global_client

        opts = _get_global_client().http_config
        return opts.host, int(opts.port)
    except Exception:  # noqa: BLE001 - older/newer Serve internals: report what we asked for
        return host, port


def run_app(app, name: str, route_prefix: str, wait: bool = True):
    """`serve.run` of one application; `wait=False` returns its handle at once, so the
    replica's process starts (mostly imports) while the caller starts other roles, and
    `wait_running(name)` waits for it afterwards."""
    from ray import serve

    ensure_serve_http()  # a cluster of our own never shares another cluster's port
    target = serve.RunTarget(app, name=name, route_prefix=route_prefix)
    return serve.run_many([target], wait_for_applications_running=wait)[0]


def wait_running(name: str, timeout_s: float = 900.0) -> None:
    """Wait for a Serve application to be RUNNING; a failed deployment raises with Serve's
    own message."""
    from ray import serve

    deadline = time.time() + timeout_s
    while True:
        app = serve.status().applications.get(name)
        status = str(app.status) if app is not None else "NOT_STARTED"
        if status.endswith("RUNNING"):
            return
        if status.endswith(("DEPLOY_FAILED", "UNHEALTHY")):
            # the application says which deployments failed; each deployment says why
            why = [f"{d}: {st.message.strip().splitlines()[-1]}"
                   for d, st in app.deployments.items() if st.message and st.message.strip()]
            raise RuntimeError(f"Serve application {name}: {status}: {app.message} "
                               + " ".join(why))
        if time.time() > deadline:
            raise RuntimeError(f"Serve application {name}: still {status} after "
                               f"{timeout_s:.0f} s")
        time.sleep(0.2)


def serve_apps() -> set[str]:
    """The Serve applications running now (none when Serve is not up)."""
    from ray import serve

    try:
        return set(serve.status().applications)
    except Exception:  # noqa: BLE001 - Serve not running
        return set()


def delete_app(name: str | None) -> None:
    """Best effort: an application already gone (or no Ray at all) is no error."""
    import ray
    from ray import serve

    if not name or not ray.is_initialized():
        return
    try:
        serve.delete(name)
    except Exception:  # noqa: BLE001
        pass
