"""Ray wiring shared by both workloads' controllers: joining or starting a cluster, and
starting a role's actor with the resources its config section gives it."""

from __future__ import annotations

import os


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


def remote_role(cls, res, bundle: int | None = None, pg=None, **extra):
    """`cls` as an actor with the role's resources; `bundle`: the index of the bundle to use
    in `pg`, or else in the current placement group (a Tune trial's group: pinned bundles
    never fragment)."""
    import ray

    opts = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus, **extra}
    if res.resources:
        opts["resources"] = dict(res.resources)
    if bundle is not None:
        from ray.util.placement_group import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg = pg or get_current_placement_group()
        if pg is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=bundle,
                placement_group_capture_child_tasks=True)
    return ray.remote(cls).options(**opts)


def run_app(app, name: str, route_prefix: str, wait: bool = True):
    """`serve.run` of one application; `wait=False` returns its handle at once, so the
    replica's process starts (mostly imports) while the caller starts other roles, and
    `wait_running(name)` waits for it afterwards."""
    from ray import serve

    target = serve.RunTarget(app, name=name, route_prefix=route_prefix)
    return serve.run_many([target], wait_for_applications_running=wait)[0]


def wait_running(name: str, timeout_s: float = 900.0) -> None:
    """Wait for a Serve application to be RUNNING; a failed deployment raises with Serve's
    own message."""
    import time

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


def run_bundles(cfg) -> list[dict[str, float]]:
    """A run's placement group (a Tune trial's): the controller first, then one bundle per role
    actor the controller starts, from the run config's placement."""
    def b(res, cpu_floor=0.0):
        d = {"CPU": max(float(res.num_cpus), cpu_floor)}
        if res.num_gpus:
            d["GPU"] = float(res.num_gpus)
        d.update(res.resources)
        return d

    p = cfg.placement
    if cfg.workload == "llm":
        out = [{"CPU": 0.25}]
        out += [b(p.generation_worker) for _ in range(p.num_generation_workers)]
        out += [b(p.learner) for _ in range(p.num_learners)]
        out.append(b(p.reward_trainer))
    else:
        out = [b(p.learner, 0.25) if p.num_learners == 0 else {"CPU": 0.25}]
        out += [b(p.env_runner) for _ in range(p.num_env_runners)]
        out += [b(p.learner) for _ in range(p.num_learners)]
        out.append(b(p.reward_trainer))
    if cfg.workload == "llm":  # indices must match llm_bundle_map: keep every bundle
        return [d if any(v > 0 for v in d.values()) else {"CPU": 0.01} for d in out]
    return [d for i, d in enumerate(out) if i == 0 or any(v > 0 for v in d.values())]


def llm_bundle_map(cfg) -> dict[str, list[int]]:
    """Bundle indices of each LLM role in `run_bundles(cfg)` (same order): every actor goes to
    its own bundle, so fractional CPUs never fragment the group."""
    p = cfg.placement
    g, n = p.num_generation_workers, p.num_learners
    return {"generation": list(range(1, 1 + g)), "learner": list(range(1 + g, 1 + g + n)),
            "reward_trainer": [1 + g + n]}
