"""The Ray wiring both controllers share: joining or starting a cluster, the placement plan
made from the config, actor and deployment options from a role's resources, process
priority, retries, and the names of every role's actor and Serve application.

Role classes are plain Python; this module is where they become actors or deployments, so
no role imports Ray's scheduling concepts and no resource is hard-coded in a decorator.
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field


# ------------------------------------------------------------------------------ the cluster


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


def stage_threads(configured: int | None, floor: int = 1) -> int:
    """Torch threads of a stage that runs alone (SFT, the reward model's first fit):
    `run.stage_threads`, else the cores of the process's own node."""
    return configured or max(floor, len(os.sched_getaffinity(0)))


@contextmanager
def torch_threads(n: int | None):
    """Torch's threads set to `n` for one block, then put back (None: left as they are; 0:
    the node's cores): a role sized for the loop takes the node while it runs alone."""
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(stage_threads(n or None))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------ names


@dataclass(frozen=True)
class RoleNames:
    """Every named actor, Serve application and placement group of one run (or trial): the
    run id makes them unique on a shared cluster, the prefix says what each one is."""

    run_id: str
    workload: str = "control"

    def of(self, role: str) -> str:
        return f"rlhf-{role}-{self.run_id}"

    labeler = property(lambda self: self.of("labeler"))
    weights = property(lambda self: self.of("weights"))  # the reward model's weight store
    pool = property(lambda self: self.of("pool"))  # the segment pool (control)
    reward_app = property(lambda self: self.of("rm"))
    label_app = property(lambda self: self.of("label"))
    group = property(lambda self: self.of(self.workload))  # a run's own placement group

    def renderer(self, i: int) -> str:
        return f"{self.of('render')}-{i}"


# the Serve applications a run starts (a sweep removes what stopped trials left behind)
APP_PREFIXES = ("rlhf-rm-", "rlhf-label-")


# ------------------------------------------------------------------------------ placement


@dataclass
class PlacementPlan:
    """A run's placement group as the config declares it: bundle 0 for the driver (the
    controller, and the control workload's in-driver learner), then one bundle per role
    actor, and which bundles each role's actors take. Runs with `placement.group_strategy`
    and Tune trials use the same plan."""

    bundles: list[dict[str, float]]
    roles: dict[str, list[int]] = field(default_factory=dict)

    def bundle(self, role: str, i: int = 0) -> int | None:
        idx = self.roles.get(role)
        return idx[i] if idx and i < len(idx) else None


def _bundle(res, cpu_floor: float = 0.0) -> dict[str, float]:
    d = {"CPU": max(float(res.num_cpus), cpu_floor)}
    if res.num_gpus:
        d["GPU"] = float(res.num_gpus)
    d.update(res.resources)
    return d


def placement_plan(cfg, driver: dict[str, float] | None = None) -> PlacementPlan:
    """The plan from `cfg.placement`. `driver`: bundle 0 (default: a quarter CPU, or the
    learner's resources where the control learner runs in the driver)."""
    p = cfg.placement
    if cfg.workload == "llm":
        actors = ([("generation", p.generation_worker)] * p.num_generation_workers
                  + [("learner", p.learner)] * p.num_learners)
        first = driver or {"CPU": 0.25}
    else:
        actors = ([("env_runner", p.env_runner)] * p.num_env_runners
                  + [("learner", p.learner)] * p.num_learners)
        first = driver or (_bundle(p.learner, 0.25) if p.num_learners == 0 else {"CPU": 0.25})
    actors.append(("reward_trainer", p.reward_trainer))
    plan = PlacementPlan([dict(first)])
    for role, res in actors:
        b = _bundle(res)
        if not any(v > 0 for v in b.values()):
            if cfg.workload != "llm":
                continue  # RLlib places its actors itself: an empty bundle holds nothing
            b = {"CPU": 0.01}  # every LLM actor is pinned to a bundle of its own
        plan.roles.setdefault(role, []).append(len(plan.bundles))
        plan.bundles.append(b)
    return plan


def start_group(plan: PlacementPlan, strategy: str, timeout_s: float, name: str):
    """A placement group of the plan's bundles (the driver's bundle included, so indices
    match); a clear error when it cannot be placed in time."""
    import ray
    from ray.util import remove_placement_group
    from ray.util.placement_group import placement_group

    pg = placement_group(plan.bundles, strategy=strategy, name=name)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise RuntimeError(
            f"placement.group_strategy={strategy}: the bundles {plan.bundles[1:]} could not be "
            f"placed within {timeout_s:.0f} s (cluster resources: {ray.cluster_resources()}); "
            "lower the roles' resources, add nodes or use PACK")
    return pg


# ------------------------------------------------------------------------------ actors


def actor_options(res, **extra) -> dict:
    """Ray actor options from a role's `RoleResources` (every actor and Serve replica)."""
    opts = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus, **extra}
    if res.resources:
        opts["resources"] = dict(res.resources)
    return opts


def lower_priority(nice: int) -> None:
    """Add `nice` to this process's niceness, once per process: batch roles yield the shared
    cores to the critical path (see `placement.batch_nice`)."""
    global _NICED
    if nice and not _NICED:
        os.nice(int(nice))
        _NICED = True


_NICED = False


def _niced(cls, nice: int):
    """`cls` whose actor process runs at `nice` (set before the role's own constructor, so
    the threads it starts inherit it)."""

    def __init__(self, *args, **kwargs):
        lower_priority(nice)
        cls.__init__(self, *args, **kwargs)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                        "__qualname__": cls.__qualname__})


def remote_role(cls, res, bundle: int | None = None, pg=None, nice: int = 0, **extra):
    """`cls` as an actor with the role's resources. `bundle`: the index of its bundle in
    `pg`, or else in the current placement group (a Tune trial's: pinned bundles never
    fragment). `nice`: see `lower_priority`."""
    import ray

    opts = actor_options(res, **extra)
    if bundle is not None:
        from ray.util.placement_group import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg = pg or get_current_placement_group()
        if pg is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=bundle,
                placement_group_capture_child_tasks=True)
    return ray.remote(_niced(cls, nice) if nice else cls).options(**opts)


def kill_all(actors) -> None:
    """Best effort at shutdown: an actor already gone is no error."""
    import ray

    for actor in actors:
        if actor is None:
            continue
        try:
            ray.kill(actor)
        except Exception:  # noqa: BLE001
            pass


def retry_call(request, patience_s: float = 120.0, timeout_s: float = 120.0):
    """`request()` -> a DeploymentResponse; its result, sending it again with backoff while
    it fails (a replica Serve is replacing, back-pressure) for up to `patience_s`."""
    give_up = time.monotonic() + patience_s
    attempt = 0
    while True:
        try:
            return request().result(timeout_s=timeout_s)
        except Exception as exc:  # noqa: BLE001 - replica death, back-pressure, timeout
            if time.monotonic() > give_up or isinstance(getattr(exc, "cause", None), ValueError):
                raise  # out of patience, or the request itself is wrong: sending it again won't help
        time.sleep(min(4.0, 0.25 * 2 ** attempt))
        attempt += 1


# ------------------------------------------------------------------------------ Serve


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

    from rlhf_ray import console
    from rlhf_ray.local_cluster import free_port

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


def peak_rss_mb() -> float:
    """This process's peak resident memory (MiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_memory(actors: dict) -> dict[str, float]:
    """Peak resident memory (MiB) of each named actor's process, asked of the actor itself;
    an actor that is gone is left out."""
    import ray

    refs = {name: a.__ray_call__.remote(lambda self: peak_rss_mb()) for name, a in actors.items()
            if a is not None}
    out = {}
    for name, ref in refs.items():
        try:
            out[name] = round(float(ray.get(ref, timeout=30)), 1)
        except Exception:  # noqa: BLE001 - a dead or busy role: nothing to report
            continue
    return out


class MemorySampler:
    """The driver machine's used memory (total - available, MiB), sampled every second in a
    daemon thread from `start()`: its peak covers every process of a one-machine run."""

    def __init__(self, every_s: float = 1.0):
        self.every_s, self.peak, self._thread = every_s, 0.0, None

    def _sample(self) -> float:
        import psutil

        vm = psutil.virtual_memory()
        return (vm.total - vm.available) / 2 ** 20

    def start(self) -> None:
        import threading

        if self._thread is not None:
            return
        self.peak = self._sample()

        def loop():
            import time

            while True:
                self.peak = max(self.peak, self._sample())
                time.sleep(self.every_s)

        self._thread = threading.Thread(target=loop, daemon=True, name="memory-sampler")
        self._thread.start()

    def peak_mb(self) -> float | None:
        return round(self.peak, 1) if self._thread is not None else None
