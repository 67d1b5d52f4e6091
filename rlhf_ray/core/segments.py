"""Trajectory segments: the unit a human (or oracle) compares (Christiano et al. 2017, 2.2.1).

A segment is k consecutive steps of one episode: what the reward model sees (observations and
actions), the true env reward (the oracle's yardstick, never a training signal), and the
simulator state of every step (MuJoCo qpos/qvel; Atari frames are the observations themselves)
so any segment can be rendered as a clip later.

Variable-length episodes are handled explicitly: a segment never crosses an episode boundary,
and an episode (or episode chunk) shorter than k steps yields no segment. Presets that follow
the paper remove termination so every episode is long enough (see `EnvConfig.remove_termination`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np

# Fields every segment carries, in this order; `state_*` fields are optional extras.
REQUIRED_FIELDS = ("obs", "actions", "true_rewards")


@dataclass
class SegmentBatch:
    """N segments of equal length k, stored as stacked arrays.

    ids: N unique strings. arrays["obs"]: [N, k, *obs_shape]; arrays["actions"]:
    [N, k, *act_shape]; arrays["true_rewards"]: [N, k]; optional arrays["state_qpos"]
    [N, k, nq], arrays["state_qvel"] [N, k, nv]. `env_steps`: [N] env steps of the run when
    each segment was collected.
    """

    ids: list[str]
    arrays: dict[str, np.ndarray]
    env_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __post_init__(self) -> None:
        n = len(self.ids)
        for name in REQUIRED_FIELDS:
            if name not in self.arrays:
                raise ValueError(f"segment batch lacks the {name!r} array")
        for name, arr in self.arrays.items():
            if arr.shape[0] != n:
                raise ValueError(f"segment array {name!r} has {arr.shape[0]} rows for {n} ids")
        if self.env_steps.shape[0] != n:
            self.env_steps = np.zeros(n, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def length(self) -> int:
        return int(self.arrays["obs"].shape[1]) if len(self) else 0

    def take(self, index: np.ndarray | list[int]) -> "SegmentBatch":
        index = np.asarray(index, dtype=np.int64)
        return SegmentBatch(
            ids=[self.ids[i] for i in index],
            arrays={k: v[index] for k, v in self.arrays.items()},
            env_steps=self.env_steps[index],
        )

    def true_returns(self) -> np.ndarray:
        return self.arrays["true_rewards"].sum(axis=1)

    @staticmethod
    def concat(batches: list["SegmentBatch"]) -> "SegmentBatch":
        batches = [b for b in batches if len(b)]
        if not batches:
            raise ValueError("nothing to concatenate")
        keys = set(batches[0].arrays)
        for b in batches[1:]:
            keys &= set(b.arrays)
        return SegmentBatch(
            ids=[i for b in batches for i in b.ids],
            arrays={k: np.concatenate([b.arrays[k] for b in batches]) for k in sorted(keys)},
            env_steps=np.concatenate([b.env_steps for b in batches]),
        )


def segment_starts(episode_len: int, length: int, max_segments: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Start indices of up to `max_segments` non-overlapping k-step windows in one episode.

    Windows are placed at random offsets so that no part of the episode is systematically
    favoured. Returns an empty array when the episode is shorter than `length`.
    """
    if episode_len < length or max_segments <= 0:
        return np.zeros(0, dtype=np.int64)
    slots = episode_len // length
    n = min(slots, max_segments)
    chosen = np.sort(rng.choice(slots, size=n, replace=False))
    slack = episode_len - slots * length
    shift = int(rng.integers(0, slack + 1))
    return (chosen * length + shift).astype(np.int64)


def cut_segments(episode: dict[str, np.ndarray], length: int, max_segments: int,
                 rng: np.random.Generator, env_steps: int = 0) -> SegmentBatch | None:
    """Cut one episode (arrays with a leading time axis of equal length T) into segments.

    `episode` holds at least obs [T, ...], actions [T, ...], true_rewards [T] (obs[t] is the
    observation the action a[t] was taken in), plus optional state_* arrays [T, ...].
    Returns None when the episode is shorter than `length`.
    """
    t = len(episode["true_rewards"])
    for name, arr in episode.items():
        if len(arr) != t:
            raise ValueError(f"episode array {name!r} has {len(arr)} steps, rewards have {t}")
    starts = segment_starts(t, length, max_segments, rng)
    if len(starts) == 0:
        return None
    window = starts[:, None] + np.arange(length)[None, :]  # [N, k]
    arrays = {name: np.asarray(arr)[window] for name, arr in episode.items()}
    ids = [uuid.uuid4().hex for _ in range(len(starts))]  # unique across restarts (not seeded)
    return SegmentBatch(ids=ids, arrays=arrays,
                        env_steps=np.full(len(starts), env_steps, dtype=np.int64))


def default_segment_length(dt: float, seconds: float = 1.5, atari: bool = False) -> int:
    """The paper's clip length: about 1.5 s of simulated time; 25 steps on Atari."""
    if atari:
        return 25
    return max(2, int(round(seconds / dt)))
