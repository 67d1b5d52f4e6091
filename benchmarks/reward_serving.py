"""Reward-model scoring through Ray Serve against the same ensemble's forward pass in one
process (a script, not a test).

The Hopper preset's reward ensemble (its real spec: obs 11, action 3, its hidden sizes and
ensemble size), random weights published once through a real weight store. Measured side by
side in one run, on one local Ray cluster:

* in process: the ensemble's forward pass on 2,048-row chunks (the limit), and on one row;
* the relabel path: `score_chunks` as the PPO learner calls it (4,096-step batches in 2,048-row
  requests, pinned to the published version), one replica;
* 64 concurrent callers of one transition each (asyncio tasks on the deployment handle in one
  driver), with 1 and 2 replicas, Serve batching off (max batch size 1) and on (64).

    python benchmarks/reward_serving.py                   # ~3 min; writes the JSON record
    python benchmarks/reward_serving.py --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
import uuid
from pathlib import Path

import numpy as np


def hopper_spec():
    import gymnasium as gym

    from rlhf_ray.config import load_config
    from rlhf_ray.control.reward import RewardNetSpec

    cfg = load_config("hopper")
    env = gym.make(cfg.env.id)
    return RewardNetSpec.for_env(cfg.reward_net(), env.observation_space, env.action_space,
                                 cfg.reward_model, cfg.score_area())


def in_process(spec, obs, act, seconds: float) -> dict:
    import torch

    from rlhf_ray.control.reward import RewardEnsemble, as_tensors

    torch.set_num_threads(1)  # as a replica runs (run.torch_threads)
    ens = RewardEnsemble(spec).eval()

    def rate(rows: int) -> float:
        o, a = as_tensors(obs[:rows], act[:rows])
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            with torch.no_grad():
                ens.member_rewards(o, a)
            n += rows
        return n / (time.perf_counter() - t0)

    return {"chunk_2048_transitions_per_s": rate(2048), "one_row_transitions_per_s": rate(1)}


def deploy(spec, store_name: str, replicas: int, max_batch: int):
    import ray

    from rlhf_ray.control.serve import deploy as deploy_rm
    from rlhf_ray.runtime.sections import RewardServeConfig

    app = f"rm-bench-{uuid.uuid4().hex[:6]}"
    cfg = RewardServeConfig(num_cpus=0, num_replicas=replicas, max_batch_size=max_batch,
                            batch_wait_timeout_s=0.005, max_ongoing_requests=128,
                            max_queued_requests=-1)
    handle = deploy_rm(spec, app_name=app, weight_store=store_name,
                       namespace=ray.get_runtime_context().namespace, serve_cfg=cfg)
    for _ in range(8 * replicas):  # every replica warm (weights loaded, first batch done)
        handle.score.remote(np.zeros((1, *spec.obs_shape), np.float32),
                            np.zeros((1, spec.act_dim), np.float32)).result()
    return app, handle


def relabel_path(handle, store, obs, act, seconds: float) -> dict:
    from rlhf_ray.control.serve import score_chunks
    from rlhf_ray.runtime.scoring import pinned_version

    n, t0, versions = 0, time.perf_counter(), set()
    while time.perf_counter() - t0 < seconds:
        res = score_chunks(handle, obs[:4096], act[:4096], 2048, version=pinned_version(store))
        versions |= {r["version"] for r in res}
        n += 4096
    return {"transitions_per_s": n / (time.perf_counter() - t0), "versions": sorted(versions)}


def callers(handle, obs, act, n_callers: int, seconds: float) -> dict:
    async def one(i: int, stop: float, lat: list) -> int:
        done = 0
        o, a = obs[i:i + 1], act[i:i + 1]
        while time.perf_counter() < stop:
            t = time.perf_counter()
            await handle.score.remote(o, a)
            lat.append(time.perf_counter() - t)
            done += 1
        return done

    async def run() -> dict:
        lat: list[float] = []
        t0 = time.perf_counter()
        done = await asyncio.gather(*(one(i, t0 + seconds, lat) for i in range(n_callers)))
        wall = time.perf_counter() - t0
        return {"requests_per_s": sum(done) / wall, "latency_p50_ms": 1e3 * np.percentile(lat, 50),
                "latency_p99_ms": 1e3 * np.percentile(lat, 99)}

    return asyncio.run(run())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--callers", type=int, default=64)
    ap.add_argument("--out", default="docs/results/reward_serving.json")
    args = ap.parse_args()
    import ray
    from ray import serve

    from rlhf_ray.control.reward import RewardEnsemble
    from rlhf_ray.storage.weights import WeightStore

    spec = hopper_spec()
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(4096, *spec.obs_shape)).astype(np.float32)
    act = rng.uniform(-1, 1, size=(4096, spec.act_dim)).astype(np.float32)
    record = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "spec": json.loads(spec.to_json()),
              "seconds": args.seconds, "callers": args.callers,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "load_before": os.getloadavg()[0]}
    record["in_process"] = in_process(spec, obs, act, args.seconds)
    print(f"in process: {record['in_process']['chunk_2048_transitions_per_s']:,.0f} "
          f"transitions/s in 2,048-row chunks, "
          f"{record['in_process']['one_row_transitions_per_s']:,.0f} one row at a time", flush=True)

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    store_name = f"ws-bench-{uuid.uuid4().hex[:6]}"
    store = ray.remote(WeightStore).options(name=store_name, num_cpus=0).remote()
    weights = {k: v.numpy() for k, v in RewardEnsemble(spec).flat_state().items()}
    ray.get(store.publish.remote(1, weights))

    app, handle = deploy(spec, store_name, 1, 64)
    record["relabel_path"] = relabel_path(handle, store, obs, act, args.seconds)
    serve.delete(app)
    ratio = record["in_process"]["chunk_2048_transitions_per_s"] / record["relabel_path"]["transitions_per_s"]
    record["relabel_path"]["in_process_over_served"] = ratio
    print(f"relabel path (1 replica): {record['relabel_path']['transitions_per_s']:,.0f} "
          f"transitions/s; in process is {ratio:.2f}x that", flush=True)

    record["callers_one_transition"] = {}
    for replicas in (1, 2):
        for max_batch in (1, 64):
            app, handle = deploy(spec, store_name, replicas, max_batch)
            res = callers(handle, obs, act, args.callers, args.seconds)
            serve.delete(app)
            key = f"{replicas} replica(s), max batch {max_batch}"
            record["callers_one_transition"][key] = res
            print(f"{args.callers} callers x 1 transition, {key}: {res['requests_per_s']:,.0f} "
                  f"requests/s (p50 {res['latency_p50_ms']:.1f} ms, p99 "
                  f"{res['latency_p99_ms']:.1f} ms)", flush=True)
    c = record["callers_one_transition"]
    record["ratios"] = {
        "batched_over_unbatched_1_replica": c["1 replica(s), max batch 64"]["requests_per_s"]
        / c["1 replica(s), max batch 1"]["requests_per_s"],
        "batched_over_unbatched_2_replicas": c["2 replica(s), max batch 64"]["requests_per_s"]
        / c["2 replica(s), max batch 1"]["requests_per_s"],
        "two_over_one_replica_batched": c["2 replica(s), max batch 64"]["requests_per_s"]
        / c["1 replica(s), max batch 64"]["requests_per_s"],
        "in_process_over_relabel_path": ratio,
    }
    record["load_after"] = os.getloadavg()[0]
    print(json.dumps(record["ratios"], indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    ray.kill(store)
    ray.shutdown()


if __name__ == "__main__":
    main()
