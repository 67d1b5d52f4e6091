"""The segment pool: recent segments from the rollout workers, the candidates for queries.

EnvRunners push a batch of segments once per `sample()` call; the controller draws candidates
from here to select queries. A ring buffer of the `pool_size` most recent segments keeps the
queries close to the current policy's behaviour, as in the paper.
"""

from __future__ import annotations

import numpy as np

from rlhf_ray.core.segments import SegmentBatch


class SegmentPool:
    def __init__(self, capacity: int, seed: int = 0):
        self.capacity = capacity
        self.rng = np.random.default_rng(seed)
        self._batches: list[SegmentBatch] = []
        self._size = 0
        self.total_added = 0

    def add(self, batch: SegmentBatch) -> int:
        if len(batch) == 0:
            return self._size
        self._batches.append(batch)
        self._size += len(batch)
        self.total_added += len(batch)
        while self._batches and self._size - len(self._batches[0]) >= self.capacity:
            self._size -= len(self._batches.pop(0))
        return self._size

    def size(self) -> int:
        return self._size

    def sample(self, n: int) -> SegmentBatch | None:
        """Up to `n` distinct segments drawn uniformly from the pool (None when empty)."""
        if not self._batches:
            return None
        if len(self._batches) > 1:
            self._batches = [SegmentBatch.concat(self._batches)]
        allb = self._batches[0]
        if len(allb) > self.capacity:  # trim the oldest
            allb = allb.take(np.arange(len(allb) - self.capacity, len(allb)))
            self._batches, self._size = [allb], len(allb)
        idx = self.rng.choice(len(allb), size=min(n, len(allb)), replace=False)
        return allb.take(np.sort(idx))

    # a checkpoint's query pool: the candidates and the draw RNG, so a resumed run asks from
    # the same segments it would have
    def snapshot(self) -> dict:
        batch = None
        if self._batches:
            self._batches = [SegmentBatch.concat(self._batches)]
            batch = self._batches[0]
        return {"batch": batch, "rng": self.rng.bit_generator.state,
                "total_added": self.total_added}

    def restore(self, snap: dict) -> int:
        batch = snap.get("batch")
        self._batches = [batch] if batch is not None and len(batch) else []
        self._size = len(batch) if batch is not None else 0
        self.rng.bit_generator.state = snap["rng"]
        self.total_added = int(snap.get("total_added", self._size))
        return self._size

