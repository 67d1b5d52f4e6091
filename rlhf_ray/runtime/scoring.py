"""What both reward-model Serve deployments share (`control.serve` for segments, `llm.serve`
for text): concurrent requests merged by `@serve.batch` into one forward pass; before each
batch one cheap call asks the weight store for a newer version, which is swapped in place (no
replica restart); every response carries the version that produced it; `info()` for tests
and metrics. A request may pin a version (`pinned_version` before a call of many requests):
a replica that has already moved past it scores that request with the pinned weights, which
the weight store keeps, so one call's scores never mix versions across replicas. A subclass
says how to load weights and how to score one merged batch.
"""

from __future__ import annotations

import os
import time

from ray import serve

from rlhf_ray.runtime.memory import peak_rss_mb
from rlhf_ray.runtime.sections import AutoscalingSettings
from rlhf_ray.runtime.serving import deployment_options, replica_options, run_app

DIRECT_ROWS = 256  # a request this large is scored on its own, without batching


class VersionedScorer:
    def __init__(self, weight_store: str, namespace: str, max_batch_size: int = 16,
                 batch_wait_timeout_s: float = 0.01, version: int = 0):
        import ray

        self.version = version
        self.store = ray.get_actor(weight_store, namespace=namespace) if weight_store else None
        self.batch_sizes: list[int] = []  # requests merged per forward pass
        self.pinned_old = 0  # requests scored with a kept older version
        self._kept: dict = {}  # version -> weights, the current one and recent pinned ones
        self.started_at = time.time()
        self._score_batch.set_max_batch_size(max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def load(self, weights) -> None:
        """Put published weights into the model."""
        raise NotImplementedError

    def forward(self, requests: list) -> list[dict]:
        """Score one merged batch of requests (payloads) with the loaded weights: one result
        dict per request."""
        raise NotImplementedError

    async def _refresh(self) -> None:
        if self.store is None:
            return
        new = await self.store.get_if_newer.remote(self.version)
        if new is not None and new[0] > self.version:  # a slower concurrent refresh loses
            version, weights = new
            self.load(weights)
            self.version = version
            self._keep(version, weights)

    def _keep(self, version: int, weights) -> None:
        """Cache a version's weights: the current one always, and the two used last."""
        self._kept.pop(version, None)
        self._kept[version] = weights
        for old in [v for v in self._kept if v != self.version][:-2]:
            del self._kept[old]

    async def _weights_of(self, version: int):
        weights = self._kept.get(version)
        if weights is None:
            weights = await self.store.get.remote(version)
            if weights is None:
                raise ValueError(f"reward model version {version} is no longer kept "
                                 f"(this replica has {self.version})")
        self._keep(version, weights)
        return weights

    async def _score(self, payload, version: int | None = None, rows: int = 1) -> dict:
        """One request, merged with concurrent ones into a batch -- unless it holds `rows` >=
        `DIRECT_ROWS` rows, a batch already, which runs at once instead of waiting for company
        (the batch timeout would be most of its cost). A pinned `version` that was never
        published or is no longer kept fails this request alone, in one line."""
        if version is not None and self.store is not None and version != self.version:
            if version > self.version:
                await self._refresh()
                if version > self.version:
                    raise ValueError(f"reward model version {version} is not published "
                                     f"(the weight store has {self.version})")
            if version < self.version:
                await self._weights_of(version)
        if rows >= DIRECT_ROWS:
            if version is None:  # a pinned one was brought to its version above
                await self._refresh()
            return (await self._run([(payload, version)]))[0]
        return await self._score_batch((payload, version))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _score_batch(self, requests: list[tuple]) -> list[dict]:
        """requests: (payload, pinned version or None); each result says its version."""
        await self._refresh()
        self.batch_sizes.append(len(requests))
        return await self._run(requests)

    async def _run(self, requests: list[tuple]) -> list[dict]:
        groups: dict[int, list[int]] = {}
        for i, (_, pin) in enumerate(requests):
            use = self.version if pin is None or self.store is None else int(pin)
            groups.setdefault(use, []).append(i)
        out: list = [None] * len(requests)
        for version, idx in sorted(groups.items()):
            if version > self.version:
                raise ValueError(f"reward model version {version} is not published "
                                 f"(the weight store has {self.version})")
            if version != self.version:  # moved past it: score with the kept weights
                self.load(await self._weights_of(version))
                self.pinned_old += len(idx)
            try:
                results = self.forward([requests[i][0] for i in idx])
            finally:
                if version != self.version:
                    self.load(self._kept[self.version])
            for i, res in zip(idx, results):
                out[i] = {**res, "version": version}
        return out

    def info(self) -> dict:
        return {"version": self.version, "pid": os.getpid(), "batch_sizes": list(self.batch_sizes),
                "pinned_old": self.pinned_old,
                "started_at": self.started_at, "peak_rss_mb": round(peak_rss_mb(), 1)}


def deploy(server_cls, name: str, bind_args: tuple, *, app_name: str, serve_cfg,
           route_prefix: str | None = None, wait: bool = True):
    """Start a scorer as its own application with the resources, replicas and queue limits
    of `placement.reward_model`; `wait=False`: see `roles.run_app`."""

    dep = serve.deployment(server_cls, name=name).options(**deployment_options(serve_cfg))
    return run_app(dep.bind(*bind_args), app_name, route_prefix or f"/{app_name}", wait)


def standalone(server_cls, name: str, args: dict, bind_args: tuple):
    """A scorer with fixed weights for `serve deploy` (no weight store): replicas and
    resources from the application's `args` (`num_replicas`, or `autoscaling` with the keys
    of `placement.reward_model.autoscaling`; `num_cpus`, `num_gpus`)."""

    scale = args.get("autoscaling")
    if scale is not None:
        from pydantic import ValidationError

        if "num_replicas" in args:
            raise ValueError(f"{name}: set args.num_replicas or args.autoscaling, not both")
        try:
            scale = AutoscalingSettings.model_validate(scale)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise ValueError(f"{name}: args.autoscaling{'.' + where if where else ''}: "
                             f"{err['msg']}") from None
    dep = serve.deployment(server_cls, name=name).options(
        **replica_options(scale, int(args.get("num_replicas", 1))),
        ray_actor_options={"num_cpus": float(args.get("num_cpus", 1)),
                           "num_gpus": float(args.get("num_gpus", 0))})
    return dep.bind(*bind_args)


def pinned_version(weight_store) -> int:
    """The version to pin every request of one call to: the newest published (one cheap
    actor call). `weight_store`: the store actor, or None (unpinned)."""
    import ray

    return None if weight_store is None else int(ray.get(weight_store.get_version.remote()))
