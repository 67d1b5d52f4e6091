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


def remote_role(cls, res, bundle: int | None = None, **extra):
    """`cls` as an actor with the role's resources; `bundle`: the index of the bundle of the
    current placement group to use (a Tune trial's group: pinned bundles never fragment)."""
    import ray

    opts = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus, **extra}
    if res.resources:
        opts["resources"] = dict(res.resources)
    if bundle is not None:
        from ray.util.placement_group import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg = get_current_placement_group()
        if pg is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=bundle,
                placement_group_capture_child_tasks=True)
    return ray.remote(cls).options(**opts)
