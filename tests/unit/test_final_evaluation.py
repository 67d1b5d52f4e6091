"""The final evaluation's summary (control/evaluation.py): returns with mean and sampled
actions, the policy's action noise, and the reward model's predicted return of the same
episodes against their true return, split back per episode."""

import numpy as np
import pytest

from rlhf_ray.control.evaluation import _corr, _summary

pytestmark = pytest.mark.unit


def test_predicted_returns_are_split_per_episode_and_compared_with_the_true_ones():
    rows = [{"return": 10.0, "length": 3, "action_std": 0.5},
            {"return": 1.0, "length": 2, "action_std": 0.7},
            {"return": 5.0, "length": 4, "action_std": None}]
    per_step = np.array([1, 2, 3, 0.5, 0.5, 1, 1, 1, 1], float)  # predicted rewards
    true = [np.array([3, 3, 4.0]), np.array([0.5, 0.5]), np.array([1, 1, 1, 2.0])]
    out = _summary(rows, per_step, true)
    assert out["returns"] == [10.0, 1.0, 5.0] and out["return_mean"] == pytest.approx(16 / 3)
    assert out["action_std_mean"] == pytest.approx(0.6)  # episodes without one left out
    assert out["rm"]["pred_returns"] == [6.0, 1.0, 4.0]
    assert out["rm"]["pred_return_mean"] == pytest.approx(11 / 3)
    assert out["rm"]["corr_episodes"] == pytest.approx(np.corrcoef([6, 1, 4], [10, 1, 5])[0, 1])
    assert out["rm"]["corr_steps"] == pytest.approx(
        np.corrcoef(per_step, np.concatenate(true))[0, 1])
    assert "rm" not in _summary(rows, None, [])  # a true-reward run has no reward model


def test_a_correlation_needs_three_values_that_vary():
    assert _corr([1, 2], [2, 3]) is None
    assert _corr([1, 1, 1], [1, 2, 3]) is None
    assert _corr([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)


def test_the_standardized_baseline_sees_each_batch_at_zero_mean_and_the_models_std():
    """run.reward=env_standardized: the true rewards of a train batch's real steps (each
    episode's last step is the learner's bootstrap step, left alone) shifted and scaled as
    the reward model's output is."""
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode

    from rlhf_ray.control.rllib import make_standardize_connector

    def episode(rewards):
        n = len(rewards)
        return SingleAgentEpisode(observations=list(range(n + 1)), actions=[0] * n,
                                  rewards=list(rewards), len_lookback_buffer=0)

    eps = [episode([1.0, 2.0, 3.0, 0.0]), episode([5.0, 9.0])]  # real: 1, 2, 3 and 5
    connector = make_standardize_connector(2.0)()
    connector(rl_module=None, batch={}, episodes=eps)
    real = np.array([1.0, 2.0, 3.0, 5.0])
    want = (real - real.mean()) / real.std() * 2.0
    got = np.concatenate([np.asarray(eps[0].get_rewards(slice(0, 3))),
                          np.asarray(eps[1].get_rewards(slice(0, 1)))])
    assert got == pytest.approx(want)
    assert eps[0].get_rewards(3) == 0.0 and eps[1].get_rewards(1) == 9.0  # bootstrap steps
