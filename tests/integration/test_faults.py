"""Faults with real processes killed (SIGKILL), on the session's local Ray cluster.

- the labeler dies during a burst of answers: it restarts, reopens the store, the answers in
  flight are retried; every acknowledged label is stored, none twice;
- a rollout worker and the reward model's Serve replica die mid-run: RLlib restarts the
  worker, Serve replaces the replica, the run finishes every iteration.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pyarrow.parquet as pq
from conftest import hopper_segments


def _pid(actor) -> int:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def test_labeler_killed_during_a_burst_loses_no_acknowledged_label(ray_cluster, tmp_path):
    import ray

    from rlhf_ray.feedback.labeler import RESTART, Labeler
    from rlhf_ray.feedback.queries import ClipPairs
    from rlhf_ray.runtime.actors import remote_role
    from rlhf_ray.runtime.sections import RoleResources
    from rlhf_ray.storage.store import PreferenceStore

    root = str(tmp_path / "prefs")
    labeler = remote_role(Labeler, RoleResources(), name="fault-labeler", **RESTART).remote(
        root, ClipPairs(), "human", 0, None, 60.0, 3600.0)
    segs = hopper_segments(120, 10)
    qids = ray.get(labeler.submit.remote(segs.take(np.arange(0, 120, 2)),
                                         segs.take(np.arange(1, 120, 2))))
    first = ray.get(labeler.stats.remote())["incarnation"]
    acked: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def answer(chunk):  # a person at the page: one answer after another, each acknowledged
        for q in chunk:
            try:
                out = ray.get(labeler.answer.remote(q, "left", "human:t"), timeout=120)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return
            if out in ("stored", "duplicate"):
                with lock:
                    acked.append(q)
            time.sleep(0.005)

    threads = [threading.Thread(target=answer, args=(qids[i::6],), daemon=True)
               for i in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while len(acked) < 15:  # mid-burst: a quarter of the answers acknowledged
        assert not errors, errors[:3]
        assert time.monotonic() < deadline, f"only {len(acked)} answers acknowledged in 120 s"
        time.sleep(0.005)
    os.kill(_pid(labeler), signal.SIGKILL)
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads), "an answering thread hung"
    assert not errors, errors[:3]
    assert sorted(acked) == sorted(qids)  # every answer was acknowledged in the end
    stats = ray.get(labeler.stats.remote())
    assert stats["incarnation"] != first  # it really restarted
    assert stats["labels_total"] == len(qids) and stats["labels_pending"] == 0
    # every acknowledged label is in the store, and none twice -- in the raw part files too
    stored = PreferenceStore(root).labels().column("query_id").to_pylist()
    assert sorted(stored) == sorted(qids)
    raw = [q for p in sorted((tmp_path / "prefs" / "labels").glob("part-*.parquet"))
           for q in pq.read_table(p).column("query_id").to_pylist()]
    assert len(raw) == len(set(raw)) == len(qids)
    ray.kill(labeler, no_restart=True)


def test_rollout_worker_and_reward_replica_killed_mid_run(ray_cluster, tmp_path):
    from ray import serve

    from rlhf_ray.config import load_config
    from rlhf_ray.control.loop import ControlController
    from rlhf_ray.control.serve import DEPLOYMENT_NAME

    cfg = load_config("hopper-smoke", ["run.total_env_steps=6000"])
    ctl = ControlController(cfg, str(tmp_path / "run"), progress=False)
    seen: dict = {"rows": []}

    def runner_pids():
        return sorted(ctl.algo.env_runner_group.foreach_env_runner(
            lambda er: os.getpid(), local_env_runner=False))

    def replica_pid():
        handle = serve.get_deployment_handle(DEPLOYMENT_NAME, ctl.names.reward_app)
        return handle.info.remote().result(timeout_s=120)["pid"]

    def on_metrics(m):
        seen["rows"].append(m)
        if m["iteration"] == 1:  # kill both between two iterations' work
            seen["runners"], seen["replica"] = runner_pids(), replica_pid()
            os.kill(seen["runners"][0], signal.SIGKILL)
            os.kill(seen["replica"], signal.SIGKILL)
        elif ctl.env_steps + cfg.ppo.train_batch_size >= cfg.run.total_env_steps:
            seen["runners_after"], seen["replica_after"] = runner_pids(), replica_pid()

    ctl.on_metrics = on_metrics
    ctl.run()
    rows = seen["rows"]
    assert rows[-1]["env_steps"] >= cfg.run.total_env_steps  # no iteration was lost
    assert [r["iteration"] for r in rows] == list(range(1, len(rows) + 1))
    assert seen["runners_after"] and seen["runners_after"] != seen["runners"]  # restarted
    assert seen["replica_after"] != seen["replica"]  # Serve replaced the replica
    # iterations while the only rollout worker restarts come back empty (RLlib samples from
    # healthy workers only); every iteration that sampled was relabelled by the reward model
    sampled = [r for prev, r in zip([{"env_steps": 0}] + rows, rows)
               if r["env_steps"] > prev["env_steps"]]
    assert all(r["pred_return_mean"] is not None for r in sampled), [
        (r["iteration"], r["env_steps"], r["pred_return_mean"]) for r in rows]
    assert rows[-1]["pred_return_mean"] is not None and rows[-1]["rm_version"] >= 1
    assert rows[-1]["labels_total"] == cfg.labels.budget


def test_stored_labels_reach_the_trainer_page_by_page_and_again_after_a_restart(
        ray_cluster, tmp_path):
    """A resumed run's labels go from the store to the reward trainer a page at a time (the
    labels of an Atari run are gigabytes: held at once, twice over, they ran a 24 GB machine
    out of memory); after the labeler dies, the store's labels become the trainer's whole
    data set again, once, not on top of what it had."""
    import ray

    from rlhf_ray.control.config import RewardModelConfig
    from rlhf_ray.control.reward import RewardNetSpec
    from rlhf_ray.control.reward_trainer import RewardTrainer
    from rlhf_ray.feedback.labeler import RESTART, Labeler
    from rlhf_ray.feedback.loop import Feedback
    from rlhf_ray.feedback.queries import ClipPairs
    from rlhf_ray.runtime.actors import kill_all, remote_role
    from rlhf_ray.runtime.sections import RoleResources
    from rlhf_ray.storage.weights import WeightStore

    labeler = remote_role(Labeler, RoleResources(), name="pages-labeler", **RESTART).remote(
        str(tmp_path / "prefs"), ClipPairs(), "human", 0, None, 60.0, 3600.0)
    segs = hopper_segments(40, 10, seed=3)
    qids = ray.get(labeler.submit.remote(segs.take(np.arange(0, 40, 2)),
                                         segs.take(np.arange(1, 40, 2))))
    answers = ["left", "right", "equal", "skip"] * 5
    for q, a in zip(qids, answers):
        assert ray.get(labeler.answer.remote(q, a, "human:t")) == "stored"
    ray.get(labeler.drain.remote())  # handed over already: only the store has them now
    pages = [ray.get(r) for r in labeler.stored.options(
        num_returns="streaming").remote(page_labels=4)]
    assert [len(p) for p in pages] == [4, 4, 4, 3]  # the 15 trainable ones (no skips)
    mu = np.concatenate([p.mu for p in pages])
    assert sorted(mu.tolist()) == sorted([1.0, 0.0, 0.5] * 5)

    spec = RewardNetSpec(net="mlp", obs_shape=segs.arrays["obs"].shape[2:], act_dim=3,
                         hidden=(16,), ensemble_size=1)
    trainer = ray.remote(RewardTrainer).options(num_cpus=0).remote(
        spec, RewardModelConfig(batch_size=4))
    store = ray.remote(WeightStore).options(num_cpus=0).remote()
    try:
        feedback = Feedback(None, None, None, kind=ClipPairs())
        feedback.labeler = labeler
        feedback.attach(trainer, store)
        assert feedback.load_stored() == 15
        feedback.feed(block=True, steps=2)  # a round on them; notes the labeler's incarnation
        os.kill(_pid(labeler), signal.SIGKILL)
        deadline = time.time() + 120
        while True:  # Ray restarts it; it reopens the store
            try:
                ray.get(labeler.stats.remote(), timeout=30)
                break
            except ray.exceptions.RayError:
                assert time.time() < deadline
                time.sleep(0.5)
        feedback.feed(block=True, steps=2)
        assert feedback.restarts == 1
        held = ray.get(trainer.__ray_call__.remote(lambda t: (t.num_labels, t._set.mu)))
        assert held[0] == 15 and sorted(held[1].tolist()) == sorted(mu.tolist())
    finally:
        kill_all([trainer, store])
        ray.kill(labeler, no_restart=True)
