import math

from rlhf_ray.core.schedule import LabelSchedule


def test_initial_fraction_and_total_budget():
    s = LabelSchedule(budget=700, initial_fraction=0.25, t0_steps=100_000, total_env_steps=1_000_000)
    assert s.initial == 175
    assert s.target(0) == 175
    assert s.target(1_000_000) == 700
    assert s.target(5_000_000) == 700


def test_rate_is_proportional_to_t0_over_t_plus_t0():
    s = LabelSchedule(budget=10_000, initial_fraction=0.0, t0_steps=1000, total_env_steps=100_000)
    # cumulative labels follow ln(1 + T/T0): the first T0 steps get ln2/ln(101) of the budget
    assert abs(s.target(1000) - 10_000 * math.log(2) / math.log(101)) <= 1
    # the rate decays: equal step windows get fewer labels later on
    early = s.target(2000) - s.target(1000)
    late = s.target(51_000) - s.target(50_000)
    assert early > 10 * late > 0


def test_targets_are_monotone_and_due_counts_what_is_missing():
    s = LabelSchedule(budget=60, initial_fraction=0.25, t0_steps=2000, total_env_steps=8000)
    targets = [s.target(t) for t in range(0, 9000, 250)]
    assert targets == sorted(targets)
    assert s.due(4000, requested=15) == s.target(4000) - 15
    assert s.due(4000, requested=10_000) == 0
