import numpy as np

from rlhf_ray.core.oracle import SyntheticOracle


def rewards(*rows):
    return np.array(rows, dtype=np.float64)


def test_rational_oracle_prefers_larger_true_return():
    o = SyntheticOracle()
    left = rewards([1, 1, 1], [0, 0, 0], [2, 2, 2])
    right = rewards([0, 0, 0], [1, 1, 1], [2, 2, 2])
    assert o.label(left, right, np.random.default_rng(0)) == ["left", "right", "equal"]


def test_equal_threshold():
    o = SyntheticOracle(equal_threshold=0.5)
    out = o.label(rewards([1.0, 0.0], [3.0, 0]), rewards([1.2, 0.0], [1.0, 0]), np.random.default_rng(0))
    assert out == ["equal", "left"]


def test_skip_threshold():
    o = SyntheticOracle(skip_threshold=1.0)
    out = o.label(rewards([0.1, 0.1], [2, 0]), rewards([0.2, 0.2], [0, 0]), np.random.default_rng(0))
    assert out == ["skip", "left"]


def test_mistakes_flip_answers():
    left = np.ones((200, 2))
    right = np.zeros((200, 2))
    assert set(SyntheticOracle(mistake_prob=1.0).label(left, right, np.random.default_rng(0))) == {"right"}
    out = SyntheticOracle(mistake_prob=0.2).label(left, right, np.random.default_rng(0))
    assert 0.1 < out.count("right") / 200 < 0.3


def test_myopic_discount_weights_late_steps_more():
    # undiscounted, left wins (3 > 2); with gamma = 0.1 the last step dominates and right wins
    left, right = rewards([3.0, 0.0]), rewards([0.0, 2.0])
    rng = np.random.default_rng(0)
    assert SyntheticOracle().label(left, right, rng) == ["left"]
    assert SyntheticOracle(gamma=0.1).label(left, right, rng) == ["right"]


def test_bradley_terry_teacher_is_stochastic_and_seeded():
    left = np.full((2000, 1), 0.5)
    right = np.zeros((2000, 1))
    o = SyntheticOracle(beta=2.0)  # P(left) = sigmoid(1) = 0.731
    a = o.label(left, right, np.random.default_rng(7))
    b = o.label(left, right, np.random.default_rng(7))
    assert a == b
    assert abs(a.count("left") / 2000 - 0.731) < 0.04
    # a very large beta approaches the rational teacher
    assert set(SyntheticOracle(beta=1e6).label(left, right, np.random.default_rng(0))) == {"left"}
