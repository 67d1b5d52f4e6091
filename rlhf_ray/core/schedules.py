"""Learning-rate schedules as multipliers of the configured rate (pure functions)."""

from __future__ import annotations

SCHEDULES = ("constant", "linear")


def lr_factor(step: int, total: int, warmup: int = 0, schedule: str = "constant") -> float:
    """The multiplier of the base rate for update `step` (0-based) of `total`: a linear
    warm-up over the first `warmup` updates ((step + 1) / warmup), then constant or a linear
    decay that reaches 0 after the last update (`linear`, as TRL's and OpenRLHF's default
    schedulers decay). Past `total` a decayed rate stays 0."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}: use "
                         f"{' or '.join(SCHEDULES)}")
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    return max(0.0, 1.0 - (step - warmup) / max(1, total - warmup))
