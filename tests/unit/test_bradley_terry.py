import math

import pytest
import torch

from rlhf_ray.core.bradley_terry import adapt_l2, bradley_terry_loss, preference_prob


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_loss_matches_hand_computed_values_without_random_responses():
    loss = bradley_terry_loss(t(1.0), t(0.0), t(1.0), random_response_prob=0.0)
    assert loss.item() == pytest.approx(-math.log(sigmoid(1.0)))  # 0.31326
    loss = bradley_terry_loss(t(1.0), t(0.0), t(0.0), random_response_prob=0.0)
    assert loss.item() == pytest.approx(-math.log(1 - sigmoid(1.0)))


def test_loss_with_ten_percent_random_responses():
    expected = -math.log(0.9 * sigmoid(1.0) + 0.05)  # 0.345378
    loss = bradley_terry_loss(t(1.0), t(0.0), t(1.0), random_response_prob=0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(0.345378, abs=1e-6)


def test_equal_label_is_half_half():
    a = bradley_terry_loss(t(2.0), t(0.5), t(0.5), 0.1)
    expected = -(0.5 * math.log(0.9 * sigmoid(1.5) + 0.05) + 0.5 * math.log(0.9 * sigmoid(-1.5) + 0.05))
    assert a.item() == pytest.approx(expected)


def test_random_response_limits():
    # eps = 1: the human answers at random, the loss is log 2 whatever the returns
    for d in (-50.0, 0.0, 3.0, 50.0):
        assert bradley_terry_loss(t(d), t(0.0), t(1.0), 1.0).item() == pytest.approx(math.log(2))
    # eps = 0.1 bounds the loss of a confidently wrong prediction by -log(0.05)
    loss = bradley_terry_loss(t(-1000.0), t(0.0), t(1.0), 0.1)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(-math.log(0.05), rel=1e-6)
    # and a confidently right one costs -log(0.95), never 0
    assert bradley_terry_loss(t(1000.0), t(0.0), t(1.0), 0.1).item() == pytest.approx(-math.log(0.95))


def test_preference_prob_is_symmetric_and_bounded():
    p = preference_prob(t(3.0), t(1.0), 0.1)
    q = preference_prob(t(1.0), t(3.0), 0.1)
    assert (p + q).item() == pytest.approx(1.0)
    assert 0.05 <= q.item() < p.item() <= 0.95


def test_gradient_pushes_preferred_segment_up():
    r1 = torch.tensor([0.0], requires_grad=True)
    r2 = torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(r1, r2, torch.tensor([1.0]), 0.1).backward()
    assert r1.grad.item() < 0 < r2.grad.item()


@pytest.mark.parametrize("train,val,expected", [
    (1.0, 2.0, 1.5e-3),     # overfitting: val > 1.5 x train -> stronger L2
    (1.0, 1.3, 1e-3),       # within [1.1, 1.5]: unchanged
    (1.0, 1.05, 1e-3 / 1.5),  # underfitting: val < 1.1 x train -> weaker L2
])
def test_adapt_l2_rule(train, val, expected):
    assert adapt_l2(1e-3, train, val) == pytest.approx(expected)


def test_adapt_l2_clips():
    assert adapt_l2(9.0, 1.0, 5.0, max_l2=10.0) == 10.0
    assert adapt_l2(1e-6, 1.0, 1.0, min_l2=1e-6) == 1e-6
