"""What both reward-model Serve deployments share (`serve_rm` for segments, `llm.serve_lm`
for text): concurrent requests merged by `@serve.batch` into one forward pass; before each
batch one cheap call asks the weight store for a newer version, which is swapped in place (no
replica restart); every response carries the version that produced it; `info()` for tests
and metrics. A subclass says how to load weights and how to score one merged batch.
"""

from __future__ import annotations

import os
import time

from ray import serve


class VersionedScorer:
    def __init__(self, weight_store: str, namespace: str, max_batch_size: int = 16,
                 batch_wait_timeout_s: float = 0.01, version: int = 0):
        import ray

        self.version = version
        self.store = ray.get_actor(weight_store, namespace=namespace) if weight_store else None
        self.batch_sizes: list[int] = []  # requests merged per forward pass
        self.started_at = time.time()
        self._score_batch.set_max_batch_size(max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def load(self, weights) -> None:
        """Put published weights into the model."""
        raise NotImplementedError

    def forward(self, requests: list) -> list[dict]:
        """Score one merged batch of requests: one result dict per request."""
        raise NotImplementedError

    async def _refresh(self) -> None:
        if self.store is None:
            return
        new = await self.store.get_if_newer.remote(self.version)
        if new is not None:
            version, weights = new
            self.load(weights)
            self.version = version

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _score_batch(self, requests: list) -> list[dict]:
        await self._refresh()
        self.batch_sizes.append(len(requests))
        return self.forward(requests)

    def info(self) -> dict:
        from rlhf_ray.roles import peak_rss_mb

        return {"version": self.version, "pid": os.getpid(), "batch_sizes": list(self.batch_sizes),
                "started_at": self.started_at, "peak_rss_mb": round(peak_rss_mb(), 1)}


def deploy(server_cls, name: str, bind_args: tuple, *, app_name: str, serve_cfg,
           route_prefix: str | None = None, wait: bool = True):
    """Start a scorer as its own application with the resources, replicas and queue limits
    of `placement.reward_model`; `wait=False`: see `roles.run_app`."""
    from rlhf_ray.roles import deployment_options, run_app

    dep = serve.deployment(server_cls, name=name).options(**deployment_options(serve_cfg))
    return run_app(dep.bind(*bind_args), app_name, route_prefix or f"/{app_name}", wait)


def standalone(server_cls, name: str, args: dict, bind_args: tuple):
    """A scorer with fixed weights for `serve deploy` (no weight store): replicas and
    resources from the application's `args` (`num_replicas`, `num_cpus`, `num_gpus`)."""
    dep = serve.deployment(server_cls, name=name).options(
        num_replicas=int(args.get("num_replicas", 1)),
        ray_actor_options={"num_cpus": float(args.get("num_cpus", 1)),
                           "num_gpus": float(args.get("num_gpus", 0))})
    return dep.bind(*bind_args)
