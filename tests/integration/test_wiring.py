"""The Ray wiring on the session's local cluster: a role started by `remote_role` keeps its
class name and gets the niceness the config asks for (the batch roles yield the cores)."""

from __future__ import annotations

import os


def test_a_niced_role_runs_nicer_and_keeps_its_name(ray_cluster):
    ray = ray_cluster

    class Probe:  # defined here: shipped to the workers by value
        def niceness(self) -> int:
            return os.nice(0)

    from rlhf_ray.runtime.actors import kill_all, remote_role
    from rlhf_ray.runtime.sections import RoleResources

    plain = remote_role(Probe, RoleResources()).remote()
    niced = remote_role(Probe, RoleResources(), nice=3, name="probe-niced").remote()
    try:
        base, lowered = ray.get([plain.niceness.remote(), niced.niceness.remote()])
        assert lowered == min(19, base + 3)
        # the class name Ray records for the actor (what `ray list actors` shows)
        assert niced._ray_actor_creation_function_descriptor.class_name == Probe.__qualname__
    finally:
        kill_all([plain, niced])


def test_the_controller_reads_the_weight_store_while_a_round_trains(ray_cluster):
    """A reward-model round publishes its own weights: the controller's calls to the weight
    store (the relabeller's `get_version` each PPO update) never wait behind a round. They
    did when the controller submitted the publish: one caller's actor calls run in order,
    and that call waited for the round's weights (Pong's 260 s rounds stalled PPO)."""
    import asyncio

    ray = ray_cluster
    from rlhf_ray.feedback.loop import Feedback
    from rlhf_ray.feedback.queries import ClipPairs
    from rlhf_ray.runtime.actors import kill_all
    from rlhf_ray.storage.weights import Publishes, WeightStore

    @ray.remote(num_cpus=0)
    class Gate:
        def __init__(self):
            self.event = asyncio.Event()

        async def wait(self):
            await self.event.wait()

        async def open(self):
            self.event.set()

        async def close(self):
            self.event.clear()

    class GatedTrainer(Publishes):  # a round that lasts until the test opens the gate
        def __init__(self, gate):
            self.gate, self.version = gate, 0

        def train(self, steps=None):
            ray.get(self.gate.wait.remote())
            self.version += 1
            return {"rm_version": self.version, "steps": steps}

        def weights(self):
            return self.version, {"w": [float(self.version)]}

        def state(self):
            return {"version": self.version}

    gate = Gate.remote()
    store = ray.remote(WeightStore).options(num_cpus=0).remote()
    trainer = ray.remote(GatedTrainer).options(num_cpus=0).remote(gate)
    try:
        feedback = Feedback(None, None, None, kind=ClipPairs())
        feedback.attach(trainer, store)
        assert feedback.publish() == 0  # version 0 was there: a stale publish is ignored
        ray.get(gate.open.remote())
        feedback.start_round(steps=1)
        feedback.finish_round()
        ray.get(gate.close.remote())
        feedback.start_round(steps=7)
        # the round is still waiting at the gate: the store answers the controller anyway,
        # with what a checkpoint keeps (the last round's weights and the trainer's state)
        assert ray.get(store.get_version.remote(), timeout=60) == 1
        assert ray.get(store.latest.remote(), timeout=60) == (1, {"w": [1.0]}, {"version": 1})
        ray.get(gate.open.remote())
        feedback.finish_round()
        assert feedback.rm_stats == {"rm_version": 2, "steps": 7}
        # the round's weights were in the store when its statistics came back
        assert ray.get(store.latest.remote(), timeout=60) == (2, {"w": [2.0]}, {"version": 2})
    finally:
        kill_all([gate, store, trainer])
