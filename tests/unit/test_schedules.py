"""Learning-rate schedules on hand numbers."""

import pytest

from rlhf_ray.core.schedules import lr_factor


def test_warmup_then_constant():
    assert [lr_factor(s, 10, warmup=4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_warmup_then_linear_decay_to_zero_after_the_last_update():
    got = [lr_factor(s, 6, warmup=2, schedule="linear") for s in range(7)]
    assert got == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0])
    assert lr_factor(0, 4, schedule="linear") == 1.0 and lr_factor(3, 4, schedule="linear") == 0.25


def test_an_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'cosine'"):
        lr_factor(0, 10, schedule="cosine")
