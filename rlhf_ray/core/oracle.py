"""Synthetic teachers: the paper's oracle and the simulated teachers of B-Pref.

Christiano et al. 2017 (section 3.1): the synthetic oracle prefers the segment with the larger
sum of true env reward. B-Pref (Lee et al. 2021, "B-Pref: Benchmarking Preference-Based RL")
makes the teacher irrational in controlled ways, applied in this order:

1. myopia: step t of a k-step segment is weighted gamma^(k-1-t) (later steps count more);
2. skip: if both segments' returns are below `skip_threshold`, answer `skip` ("can't tell");
3. equal: if the returns differ by less than `equal_threshold`, answer `equal`;
4. Bradley-Terry: with temperature `beta`, prefer left with probability sigmoid(beta (R1-R2));
   `beta=None` is the perfectly rational teacher (always the larger return);
5. mistake: with probability `mistake_prob` the answer is flipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LABELS = ("left", "right", "equal", "skip")


@dataclass(frozen=True)
class SyntheticOracle:
    beta: float | None = None
    gamma: float = 1.0
    mistake_prob: float = 0.0
    skip_threshold: float | None = None
    equal_threshold: float = 0.0

    def discounted_returns(self, rewards: np.ndarray) -> np.ndarray:
        """rewards: [P, k] -> [P] myopically discounted sums."""
        k = rewards.shape[1]
        weights = self.gamma ** np.arange(k - 1, -1, -1, dtype=np.float64)
        return (rewards.astype(np.float64) * weights).sum(axis=1)

    def label(self, rewards_left: np.ndarray, rewards_right: np.ndarray,
              rng: np.random.Generator) -> list[str]:
        """Answer P comparisons. rewards_*: [P, k] true env rewards of each segment."""
        r1 = self.discounted_returns(rewards_left)
        r2 = self.discounted_returns(rewards_right)
        n = len(r1)
        if self.beta is None:
            left = r1 > r2
            # exact ties of a rational teacher are `equal`
            tie = r1 == r2
        else:
            p_left = 1.0 / (1.0 + np.exp(-np.clip(self.beta * (r1 - r2), -50, 50)))
            left = rng.random(n) < p_left
            tie = np.zeros(n, dtype=bool)
        flip = rng.random(n) < self.mistake_prob
        left = np.where(flip, ~left, left)
        out = np.where(left, "left", "right").astype(object)
        out[tie] = "equal"
        if self.equal_threshold > 0:
            out[np.abs(r1 - r2) < self.equal_threshold] = "equal"
        if self.skip_threshold is not None:
            out[np.maximum(r1, r2) < self.skip_threshold] = "skip"
        return [str(x) for x in out]
