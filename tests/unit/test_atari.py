"""Atari as the paper did it (Christiano et al. 2017, appendix A.2), on real ALE games: the
reward model never sees the score, a game over and a lost life are not told to the agent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlhf_ray.config import load_config
from rlhf_ray.control.config import RewardModelConfig
from rlhf_ray.control.envs import ATARI_SCORE_AREAS, atari_game, make_env
from rlhf_ray.control.reward import RewardNetSpec, build_member
from rlhf_ray.errors import ConfigError

pytestmark = pytest.mark.unit


def _frames_around_a_point(env_id: str, max_steps: int = 3000):
    """The observation just before the first point of a random game and one 10 steps after
    it (the score's digits change a few frames after the reward)."""
    env = make_env({"id": env_id, "preprocessing": "atari",
                    "kwargs": {"repeat_action_probability": 0.0}})
    obs, _ = env.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(max_steps):
        before = obs
        obs, reward, *_ = env.step(int(rng.integers(env.action_space.n)))
        if reward != 0:
            for _ in range(10):
                obs, *_ = env.step(0)
            return env, before, obs
    raise AssertionError(f"{env_id}: no point in {max_steps} random steps")


def test_pongs_score_area_covers_the_score_and_the_reward_model_cannot_see_it():
    env, before, after = _frames_around_a_point("ALE/Pong-v5")
    newest_b, newest_a = before[..., -1], after[..., -1]
    wall = int(np.flatnonzero(newest_a.mean(1) > 0.5)[0])  # the playfield's top wall
    changed = np.argwhere(np.abs(newest_a[:wall] - newest_b[:wall]) > 0.05)
    assert len(changed) > 0  # the score changed above the wall
    (r0, r1, c0, c1), = ATARI_SCORE_AREAS["Pong"]
    assert all(r0 <= r < r1 and c0 <= c < c1 for r, c in changed)
    # the CNN: the score's pixels make no difference, any others do
    cfg = load_config("pong-smoke")
    assert cfg.score_area() == ATARI_SCORE_AREAS["Pong"]
    spec = RewardNetSpec.for_env("cnn", env.observation_space, env.action_space,
                                 RewardModelConfig(), cfg.score_area())
    spec = RewardNetSpec.from_json(spec.to_json())  # as the Serve replicas rebuild it
    torch.manual_seed(0)
    net = build_member(spec).eval()
    seen = torch.as_tensor(np.stack([before, before]))
    other = seen.clone()
    other[1, :wall] = torch.as_tensor(after[:wall])  # the other score, the same play
    with torch.no_grad():
        a, b = net(seen), net(other)
    assert torch.equal(a[1], b[1])
    assert torch.equal(seen[1, :wall], torch.as_tensor(before[:wall]))  # input left alone
    moved = seen.clone()
    moved[1, 40:44, 40:44] = 0.8  # something in the playfield
    with torch.no_grad():
        assert not torch.equal(net(moved)[1], a[1])
    blind = build_member(RewardNetSpec.for_env("cnn", env.observation_space, env.action_space,
                                               RewardModelConfig())).eval()
    with torch.no_grad():  # without the area the same net does see the score
        assert not torch.equal(blind(seen)[1], blind(other)[1])


def test_game_over_restarts_the_game_as_a_truncation():
    env = make_env({"id": "ALE/Pong-v5", "preprocessing": "atari", "remove_termination": True,
                    "kwargs": {"repeat_action_probability": 0.0}})
    env.reset(seed=0)
    for t in range(20_000):  # a random player loses 0-21 in about a thousand steps
        _, _, terminated, truncated, _ = env.step(0)
        assert not terminated
        if truncated:
            break
    assert truncated and env.unwrapped.ale.game_over()
    assert t < 19_000


@pytest.mark.parametrize("episodic_life", [False, True])
def test_a_lost_life_ends_an_episode_only_when_asked(episodic_life):
    env = make_env({"id": "ALE/Breakout-v5", "preprocessing": "atari",
                    "episodic_life": episodic_life, "kwargs": {"repeat_action_probability": 0.0}})
    env.reset(seed=0)
    ale = env.unwrapped.ale
    lives = ale.lives()
    for _ in range(5000):
        _, _, terminated, truncated, _ = env.step(1)  # FIRE, then the ball is missed
        if ale.lives() < lives:
            break
    assert ale.lives() == lives - 1
    assert terminated is episodic_life and not truncated


def test_score_area_errors_name_the_setting():
    with pytest.raises(ConfigError, match="no known score area for env.id='ALE/Seaquest-v5'"):
        load_config("pong-smoke", ["env.id=ALE/Seaquest-v5"])
    with pytest.raises(ConfigError, match=r"score_area box \[0, 90, 0, 84\]"):
        load_config("pong-smoke", ["reward_model.score_area=[[0, 90, 0, 84]]"])
    cfg = load_config("pong-smoke", ["env.id=ALE/Seaquest-v5", "reward_model.score_area=[]"])
    assert cfg.score_area() == []
    assert atari_game("ALE/Pong-v5") == atari_game("PongNoFrameskip-v4") == "Pong"
