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
