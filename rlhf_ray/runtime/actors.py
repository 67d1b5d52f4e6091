"""Role classes become Ray actors here, with the resources their config section gives
(never a resource hard-coded in a decorator): actor options, process priority, torch threads,
retries and stopping. Role classes stay plain Python."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager


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
