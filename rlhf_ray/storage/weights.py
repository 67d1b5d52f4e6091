"""Weights flow by version: the reward trainer publishes (version, weights) once; every
reward-model replica picks up a newer version itself with one cheap call per batch, and a
replica that restarts loads the latest version on its own.

With several replicas, one replica may have swapped while another has not: a caller that
needs every score of one call from one version (a PPO update's relabelling) asks the store for
the current version first and pins its requests to it. The store keeps the last `keep`
versions, so a replica that has already moved on can still answer a pinned request.
"""

from __future__ import annotations

import numpy as np


class WeightStore:
    """Holds the latest published reward-model weights (flat name -> array dict) and the
    `keep - 1` versions before them."""

    def __init__(self, keep: int = 3) -> None:
        self.keep = max(1, int(keep))
        self.version = 0
        self.kept: dict[int, dict[str, np.ndarray]] = {}
        self.trainer_state: dict | None = None  # the trainer's, when it published the newest

    def publish(self, version: int, weights: dict[str, np.ndarray],
                trainer_state: dict | None = None) -> int:
        if version <= self.version:
            return self.version  # stale publish: ignore, never go backwards
        self.version = version
        self.kept[version] = weights
        self.trainer_state = trainer_state
        for old in sorted(self.kept)[:-self.keep]:
            del self.kept[old]
        return self.version

    def latest(self) -> tuple[int, dict[str, np.ndarray], dict | None] | None:
        """(version, weights, trainer state) of the newest publish, None before the first:
        what a checkpoint keeps of the reward model without waiting for a round in flight."""
        if self.version not in self.kept:
            return None
        return self.version, self.kept[self.version], self.trainer_state

    def get_version(self) -> int:
        return self.version

    def get_if_newer(self, version: int) -> tuple[int, dict[str, np.ndarray]] | None:
        if self.version > version and self.version in self.kept:
            return self.version, self.kept[self.version]
        return None

    def get(self, version: int) -> dict[str, np.ndarray] | None:
        """The weights of one kept version (None once it has been dropped)."""
        return self.kept.get(int(version))


class Publishes:
    """A reward trainer that puts each round's weights into the weight store itself, when the
    round ends. Publishing from the controller instead (`store.publish.remote(trainer.weights
    .remote())`) queued every later call the controller made to the store -- the relabeller's
    `get_version` among them -- behind the whole round: Ray runs one caller's calls to an
    actor in order, and a call waits for its arguments."""

    def train_and_publish(self, weight_store, **train_kwargs) -> dict:
        stats = self.train(**train_kwargs)
        self.publish(weight_store)
        return stats

    def publish(self, weight_store) -> int:
        """This trainer's weights, and its state where it has one (what a checkpoint
        restores it from), into the store; returns the store's version."""
        import ray

        state = self.state() if hasattr(self, "state") else None
        return ray.get(weight_store.publish.remote(*self.weights(), state))
