"""Starting and stopping what humans need to label: the labeling app (and whatever the
workload's query kind needs beside it, e.g. clip renderers), at a URL of the run's own, and
checking that the printed URL reaches it.

Used by `Feedback` (`labeler.source=human|mixed`) and by `rlhf-ray label RUN_DIR`
(`rlhf_ray.label`), which labels the pending queries of an existing run on their own.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable

import ray

from rlhf_ray.feedback import app as labeling_app
from rlhf_ray.runtime.actors import kill_all
from rlhf_ray.runtime.names import RoleNames
from rlhf_ray.runtime.serving import delete_app, ensure_serve_http, wait_running


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
            shown = ray.util.get_node_ip_address()
        except Exception:  # noqa: BLE001
            shown = socket.gethostname()
    prefix = route_prefix.rstrip("/")
    return f"http://{shown}:{port}{prefix}/?token={token}"


def route_prefix(cfg, run_name: str) -> str:
    """`labeler.route_prefix`, else `/label/<run name>` (characters a URL path keeps)."""
    if cfg.labeler.route_prefix:
        return cfg.labeler.route_prefix
    return "/label/" + (re.sub(r"[^A-Za-z0-9_.-]", "-", run_name) or "run")


def check_page(url: str, token: str, app_name: str, timeout_s: float = 60.0) -> None:
    """Raise unless `url` reaches the labeling app `app_name` with `token` (its status
    route names the app): a page that lands on another run's app is never printed."""
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


def start_labeling(cfg, names: RoleNames, namespace: str, store_root: str, run_name: str,
                   helpers: Callable[..., list] | None = None) -> LabelingRoles:
    """The labeling page for the labeler `names.labeler` at `route_prefix(cfg, run_name)`,
    and the `helpers` its query kind needs (the workload's `page_helpers`, e.g. clip
    renderers); returns once the printed URL is checked to reach it."""
    lab = cfg.labeler
    token = lab.token or labeling_app.new_token()
    host, port = ensure_serve_http(lab.host, lab.port)
    prefix = route_prefix(cfg, run_name)
    renderers = helpers(cfg, names, namespace, store_root) if helpers else []
    labeling_app.deploy(labeler_name=names.labeler, namespace=namespace, store_root=store_root,
                        token=token, app_name=names.label_app, route_prefix=prefix,
                        res=cfg.placement.labeling_app, instruction=lab.instruction)
    roles = LabelingRoles(names.label_app, public_url(host, port, prefix, token), token, renderers)
    try:
        wait_running(names.label_app)
        check_page(roles.url, token, names.label_app)
    except BaseException:
        stop_labeling(roles)
        raise
    return roles


def stop_labeling(roles: LabelingRoles | None) -> None:
    if roles is None:
        return
    delete_app(roles.app_name)
    kill_all(roles.renderers)
