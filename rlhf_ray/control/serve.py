"""The reward model as a Ray Serve deployment that batch-scores whatever callers send.

Callers send transitions (obs [n, ...], actions [n, ...]): a learner connector relabelling a
train batch, the controller scoring query candidates, or anyone over HTTP (`POST /score` with
JSON `{"obs": [...], "actions": [...]}`). Concurrent requests are merged by `@serve.batch` into
one forward pass. Before each batch the replica asks the weight store, in one cheap call,
whether a newer version exists and swaps it in place: no replica restart. Every response
carries the version that produced it.
"""

from __future__ import annotations

import numpy as np
import torch

from rlhf_ray.control.reward import (
    RewardEnsemble,
    RewardNetSpec,
    as_tensors,
    load_weights,
)
from rlhf_ray.runtime.actors import retry_call
from rlhf_ray.runtime.scoring import VersionedScorer, standalone
from rlhf_ray.runtime.scoring import deploy as _deploy

DEPLOYMENT_NAME = "RewardModel"


class RewardModelServer(VersionedScorer):
    def __init__(self, spec_json: str, weight_store: str, namespace: str,
                 max_batch_size: int = 16, batch_wait_timeout_s: float = 0.01,
                 torch_threads: int = 1, weights_path: str | None = None):
        torch.set_num_threads(torch_threads)
        self.spec = RewardNetSpec.from_json(spec_json)
        torch.manual_seed(0)  # before any publish, every replica scores with the same weights
        self.ensemble = RewardEnsemble(self.spec).eval()
        version = 0
        if weights_path:  # fixed weights from a checkpoint (standalone `serve deploy`)
            state, _, version = load_weights(weights_path)
            self.ensemble.load_flat_state(state)
        super().__init__(weight_store, namespace, max_batch_size, batch_wait_timeout_s, version)

    def load(self, weights) -> None:
        self.ensemble.load_flat_state(weights)

    def forward(self, requests: list[tuple[np.ndarray, np.ndarray]]) -> list[dict]:
        sizes = [len(o) for o, _ in requests]
        obs = np.concatenate([o for o, _ in requests])
        act = np.concatenate([a for _, a in requests])
        members = self.ensemble.member_rewards(*as_tensors(obs, act)).numpy()  # [K, N]
        reward = members.mean(axis=0)
        out, start = [], 0
        for n in sizes:
            out.append({"reward": reward[start:start + n], "members": members[:, start:start + n],
                        "version": self.version})
            start += n
        return out

    async def score(self, obs: np.ndarray, actions: np.ndarray,
                    version: int | None = None) -> dict:
        """obs: [n, *obs_shape], actions: [n, ...] -> {reward [n], members [K, n], version};
        `version`: score with that version's weights (see `scoring.pinned_version`)."""
        obs, actions = np.asarray(obs), np.asarray(actions)
        if len(obs) != len(actions):
            raise ValueError(f"obs has {len(obs)} rows, actions {len(actions)}")
        return await self._score((obs, actions), version, len(obs))

    async def __call__(self, request) -> dict:
        from starlette.responses import JSONResponse

        try:
            body = await request.json()
            obs = np.asarray(body["obs"], dtype=np.float32)
            act = np.asarray(body["actions"], dtype=np.float32)
            if obs.shape[1:] != tuple(self.spec.obs_shape):
                raise ValueError(f"obs rows must have shape {list(self.spec.obs_shape)}")
            version = body.get("version")
            if version is not None and (not isinstance(version, int) or version < 0):
                raise ValueError("version must be a non-negative integer")
        except Exception as exc:  # malformed JSON or arrays: a client error, not a 500
            return JSONResponse({"error": f"bad request: {exc}"}, status_code=422)
        try:
            res = await self.score(obs, act, version)
        except ValueError as exc:  # a version never published or no longer kept
            return JSONResponse({"error": str(exc)}, status_code=409)
        return {"reward": res["reward"].tolist(), "version": res["version"]}


def score_chunks(handle, obs: np.ndarray, act: np.ndarray, chunk: int,
                 patience_s: float = 120.0, timeout_s: float = 120.0,
                 version: int | None = None) -> list[dict]:
    """Score [n] transitions in chunks, all requests in flight at once, in order, every one
    pinned to `version` when given (then all results carry that version). A chunk
    whose request fails -- its replica died and Serve is replacing it, or the deployment
    answered with back-pressure -- is sent again by `retry_call`, so a lost replica costs a
    moment, never an iteration."""
    starts = list(range(0, len(obs), chunk))
    pending = [handle.score.remote(obs[s:s + chunk], act[s:s + chunk], version) for s in starts]
    results = []
    for s, resp in zip(starts, pending):
        try:
            results.append(resp.result(timeout_s=timeout_s))
        except Exception as exc:  # noqa: BLE001 - replica death, back-pressure, timeout
            if isinstance(getattr(exc, "cause", None), ValueError):
                raise  # the request itself is wrong (a version not kept): no retry helps
            results.append(retry_call(
                lambda s=s: handle.score.remote(obs[s:s + chunk], act[s:s + chunk], version),
                patience_s, timeout_s))
    return results


def segment_returns(handle, batch, chunk_segments: int = 256,
                    version: int | None = None) -> np.ndarray:
    """Each ensemble member's predicted return of each segment of a `SegmentBatch`: [K, N]
    (one batched request per chunk, all in flight at once, pinned to `version`)."""
    obs, act = batch.arrays["obs"], batch.arrays["actions"]
    n, k = obs.shape[:2]
    results = score_chunks(handle, obs.reshape(n * k, *obs.shape[2:]),
                           act.reshape(n * k, *act.shape[2:]), chunk_segments * k,
                           version=version)
    members = np.concatenate([r["members"] for r in results], axis=1)
    return members.reshape(members.shape[0], n, k).sum(axis=2)


class SegmentReturnsCache:
    """Each member's predicted return of a segment, kept for one reward-model version: the
    query candidates are drawn from a pool of recent segments, and most of them were scored
    in an earlier iteration under the same version (an Atari round spans about 15 PPO
    iterations). A new version starts over. The replicas score in eval mode, so a cached
    return is the one a new request would get."""

    def __init__(self, max_segments: int):
        self.max_segments = max(1, int(max_segments))
        self.version: int | None = None
        self._returns: dict[str, np.ndarray] = {}  # segment id -> [K], oldest first
        self.scored = self.reused = 0  # segments sent to the replicas / answered from here

    def returns(self, batch, version: int | None, score) -> np.ndarray:
        """[K, N] for the segments of `batch`; `score(sub_batch)` -> [K, n] asks the reward
        model for the segments not kept (pinned to `version`)."""
        if version is None or version != self.version:
            self.version, self._returns = version, {}
        missing = [i for i, sid in enumerate(batch.ids) if sid not in self._returns]
        if missing:
            fresh = score(batch.take(missing))
            for col, i in enumerate(missing):
                self._returns[batch.ids[i]] = fresh[:, col]
        self.scored += len(missing)
        self.reused += len(batch) - len(missing)
        out = np.stack([self._returns[sid] for sid in batch.ids], axis=1)
        while len(self._returns) > self.max_segments:  # the oldest segments go first
            del self._returns[next(iter(self._returns))]
        return out


def deploy(spec: RewardNetSpec, *, app_name: str, weight_store: str, namespace: str,
           serve_cfg, torch_threads: int = 1, route_prefix: str | None = None,
           wait: bool = True):
    """Start the reward-model application; resources and batching come from the config.
    `wait=False`: see `roles.run_app`."""
    return _deploy(RewardModelServer, DEPLOYMENT_NAME,
                   (spec.to_json(), weight_store, namespace, serve_cfg.max_batch_size,
                    serve_cfg.batch_wait_timeout_s, torch_threads),
                   app_name=app_name, serve_cfg=serve_cfg, route_prefix=route_prefix, wait=wait)


def app_builder(args: dict):
    """Serve application builder for `serve deploy serve/reward_model.yaml`.

    args: `weights` (a checkpoint's reward_model.safetensors), optional `max_batch_size`,
    `batch_wait_timeout_s`, `num_replicas` or `autoscaling` (min/max/initial replicas,
    target ongoing requests, delays), `num_cpus`, `num_gpus`, `torch_threads`.
    """
    path = args.get("weights")
    if not path:
        raise ValueError("reward-model app: set args.weights to a reward_model.safetensors file")
    _, spec, _ = load_weights(path)
    return standalone(RewardModelServer, DEPLOYMENT_NAME, args, (
        spec.to_json(), "", "", int(args.get("max_batch_size", 16)),
        float(args.get("batch_wait_timeout_s", 0.01)), int(args.get("torch_threads", 1)), path))
