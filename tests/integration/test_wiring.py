"""The Ray wiring on the session's local cluster: a role started by `remote_role` keeps its
class name and gets the niceness the config asks for (the batch roles yield the cores)."""

from __future__ import annotations

import os


def test_a_niced_role_runs_nicer_and_keeps_its_name(ray_cluster):
    ray = ray_cluster

    class Probe:  # defined here: shipped to the workers by value
        def niceness(self) -> int:
            return os.nice(0)

    from rlhf_ray.config import RoleResources
    from rlhf_ray.roles import kill_all, remote_role

    plain = remote_role(Probe, RoleResources()).remote()
    niced = remote_role(Probe, RoleResources(), nice=3, name="probe-niced").remote()
    try:
        base, lowered = ray.get([plain.niceness.remote(), niced.niceness.remote()])
        assert lowered == min(19, base + 3)
        # the class name Ray records for the actor (what `ray list actors` shows)
        assert niced._ray_actor_creation_function_descriptor.class_name == Probe.__qualname__
    finally:
        kill_all([plain, niced])
