"""How many labels should exist after T env steps (Christiano et al. 2017, appendix A).

A fraction of the budget comes from the initial random policy; after that labels arrive at
a rate proportional to T0 / (T + T0), so the cumulative count grows as T0 * ln(1 + T/T0),
scaled so that the whole budget is spent at the last env step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LabelSchedule:
    budget: int
    initial_fraction: float
    t0_steps: int
    total_env_steps: int

    @property
    def initial(self) -> int:
        return int(round(self.budget * self.initial_fraction))

    def target(self, env_steps: int) -> int:
        """Labels that should have been requested once `env_steps` steps were taken."""
        if env_steps <= 0:
            return self.initial
        t = min(env_steps, self.total_env_steps)
        rest = self.budget - self.initial
        frac = math.log1p(t / self.t0_steps) / math.log1p(self.total_env_steps / self.t0_steps)
        return min(self.budget, self.initial + int(math.floor(rest * frac + 1e-9)))

    def due(self, env_steps: int, requested: int) -> int:
        """Labels to request now, given how many were already requested."""
        return max(0, self.target(env_steps) - requested)
