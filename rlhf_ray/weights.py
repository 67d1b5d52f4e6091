"""Weights flow by version: the reward trainer publishes (version, weights) once; every
reward-model replica picks up a newer version itself with one cheap call per batch, and a
replica that restarts loads the latest version on its own.
"""

from __future__ import annotations

import numpy as np


class WeightStore:
    """Holds the latest published reward-model weights (flat name -> array dict)."""

    def __init__(self) -> None:
        self.version = 0
        self.weights: dict[str, np.ndarray] | None = None

    def publish(self, version: int, weights: dict[str, np.ndarray]) -> int:
        if version <= self.version:
            return self.version  # stale publish: ignore, never go backwards
        self.version, self.weights = version, weights
        return self.version

    def get_version(self) -> int:
        return self.version

    def get_if_newer(self, version: int) -> tuple[int, dict[str, np.ndarray]] | None:
        if self.version > version and self.weights is not None:
            return self.version, self.weights
        return None
