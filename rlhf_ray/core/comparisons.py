"""Labelled pairs of segments, as the labeler hands them to the reward trainer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Comparisons:
    """P labelled pairs. *_obs: [P, k, *obs_shape]; *_act: [P, k, *act_shape]; mu: [P]
    (1 left better, 0 right better, 0.5 equal)."""

    left_obs: np.ndarray
    left_act: np.ndarray
    right_obs: np.ndarray
    right_act: np.ndarray
    mu: np.ndarray

    def __len__(self) -> int:
        return len(self.mu)


class ComparisonSet:
    """The reward trainer's labelled pairs, held as the parts they arrived in: rows are
    gathered per minibatch, never concatenated into one copy (an Atari pair is 1.4 MB, so a
    few thousand labels are gigabytes), and the oldest parts can be let go once a label
    buffer has moved past them."""

    def __init__(self) -> None:
        self._parts: list[Comparisons] = []
        self._ends = np.zeros(0, dtype=np.int64)  # exclusive end row of each part

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def append(self, c: Comparisons) -> None:
        if len(c):
            self._parts.append(c)
            self._ends = np.append(self._ends, len(self) + len(c))

    def drop_before(self, row: int) -> int:
        """Let go of the leading parts that end at or before `row`; returns how many rows
        went (every row after shifts down by as many)."""
        n = int(np.searchsorted(self._ends, row, side="right"))
        if n == 0:
            return 0
        gone = int(self._ends[n - 1])
        self._parts, self._ends = self._parts[n:], self._ends[n:] - gone
        return gone

    @property
    def segment_values(self) -> int:
        """Observation values in one segment (frames x pixels, or steps x features)."""
        return int(np.prod(self._parts[0].left_obs.shape[1:])) if self._parts else 1

    @property
    def segment_len(self) -> int:
        return int(self._parts[0].left_obs.shape[1]) if self._parts else 0

    @property
    def mu(self) -> np.ndarray:
        return (np.concatenate([p.mu for p in self._parts]) if self._parts
                else np.zeros(0, dtype=np.float32))

    def _gather(self, fields: list[str], rows: np.ndarray, steps: np.ndarray | None = None
                ) -> list[np.ndarray]:
        """fields[j][rows[i]] (at step steps[i], if given) for every i, in order: one
        output array per field, filled part by part."""
        rows = np.asarray(rows, dtype=np.int64)
        part = np.searchsorted(self._ends, rows, side="right")
        starts = np.concatenate([[0], self._ends[:-1]])
        outs = []
        for f in fields:
            ref = getattr(self._parts[0], f)
            shape = ref.shape[2:] if steps is not None else ref.shape[1:]
            outs.append(np.empty((len(rows), *shape), dtype=ref.dtype))
        for p in np.unique(part):
            sel = np.flatnonzero(part == p)
            local = rows[sel] - starts[p]
            for out, f in zip(outs, fields):
                arr = getattr(self._parts[p], f)
                out[sel] = arr[local] if steps is None else arr[local, steps[sel]]
        return outs

    def pairs(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The pairs `idx` as one batch of 2B segments (the B left ones, then the B right
        ones): obs [2B, k, ...], act [2B, k, ...], mu [B]."""
        lo, la, ro, ra, mu = self._gather(["left_obs", "left_act", "right_obs", "right_act",
                                           "mu"], idx)
        return np.concatenate([lo, ro]), np.concatenate([la, ra]), mu

    def transitions(self, flat: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Transitions of the labelled segments: all of them (every left segment's, then
        every right one's) when `flat` is None, else those at these positions of that
        order."""
        k, n = self.segment_len, len(self)
        if flat is None:
            flat = np.arange(2 * n * k)
        flat = np.asarray(flat, dtype=np.int64)
        side, rest = np.divmod(flat, n * k)
        rows, steps = np.divmod(rest, k)
        obs = np.empty((len(flat), *self._parts[0].left_obs.shape[2:]),
                       dtype=self._parts[0].left_obs.dtype)
        act = np.empty((len(flat), *self._parts[0].left_act.shape[2:]),
                       dtype=self._parts[0].left_act.dtype)
        for s, (fo, fa) in enumerate((("left_obs", "left_act"), ("right_obs", "right_act"))):
            sel = np.flatnonzero(side == s)
            if len(sel):
                obs[sel], act[sel] = self._gather([fo, fa], rows[sel], steps[sel])
        return obs, act
