"""Which pairs to ask about (Christiano et al. 2017, section 2.2.4).

"We sample a large number of pairs of trajectory segments, use each reward predictor in our
ensemble to predict which segment will be preferred from each pair, and then select those
trajectories for which the predictions have the highest variance across ensemble members."
"""

from __future__ import annotations

import numpy as np


def candidate_pairs(num_segments: int, num_pairs: int, rng: np.random.Generator) -> np.ndarray:
    """[num_pairs, 2] indices of distinct segments, sampled uniformly."""
    if num_segments < 2:
        raise ValueError(f"need at least 2 segments to form a pair, have {num_segments}")
    left = rng.integers(0, num_segments, size=num_pairs)
    offset = rng.integers(1, num_segments, size=num_pairs)
    right = (left + offset) % num_segments  # never equal to left
    return np.stack([left, right], axis=1)


def preference_variance(member_returns: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Variance across ensemble members of P(left > right).

    member_returns: [K, N] each member's predicted return of each segment.
    pairs: [P, 2]. Returns [P].
    """
    delta = member_returns[:, pairs[:, 0]] - member_returns[:, pairs[:, 1]]  # [K, P]
    prob = 1.0 / (1.0 + np.exp(-np.clip(delta, -50, 50)))
    return prob.var(axis=0)


def select_queries(member_returns: np.ndarray, num_queries: int, oversampling: int,
                   rng: np.random.Generator, method: str = "variance") -> np.ndarray:
    """Pick `num_queries` pairs of segment indices: [num_queries, 2].

    `variance`: the highest-disagreement pairs among num_queries * oversampling candidates.
    `uniform`: uniformly random pairs (the paper's ablation).
    """
    num_segments = member_returns.shape[1]
    if method == "uniform":
        return candidate_pairs(num_segments, num_queries, rng)
    if method != "variance":
        raise ValueError(f"unknown query selection {method!r}: use 'variance' or 'uniform'")
    pairs = candidate_pairs(num_segments, num_queries * oversampling, rng)
    var = preference_variance(member_returns, pairs)
    top = np.argsort(-var, kind="stable")[:num_queries]
    return pairs[top]
