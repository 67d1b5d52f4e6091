"""The PPO policy's initial action noise (`ppo.log_std_init`, control/policy.py)."""

from dataclasses import asdict

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from rlhf_ray.control.config import PPOConfig
from rlhf_ray.control.policy import PPOPolicyModule

OBS = gym.spaces.Box(-np.inf, np.inf, (17,), np.float32)


def _module(action_space, init, free=False):
    torch.manual_seed(0)
    cfg = {**asdict(DefaultModelConfig(fcnet_hiddens=[64, 64], free_log_std=free)),
           "log_std_init": init}
    return RLModuleSpec(module_class=PPOPolicyModule, observation_space=OBS,
                        action_space=action_space, model_config=cfg).build()


@pytest.mark.parametrize("free", [False, True])
def test_the_gaussian_starts_with_the_configured_noise(free):
    """State-dependent (RLlib's default) or free log std: the initial std is exp(init) in
    every state, where RLlib's own start is about 1; the means are untouched."""
    act = gym.spaces.Box(-1.0, 1.0, (6,), np.float32)
    obs = {"obs": torch.randn(256, 17)}
    with torch.no_grad():
        ours = _module(act, -1.0, free).forward_inference(obs)["action_dist_inputs"]
        rllib = _module(act, None, free).forward_inference(obs)["action_dist_inputs"]
    std = ours[:, 6:].exp()
    assert std.mean().item() == pytest.approx(np.exp(-1.0), rel=0.1)
    assert std.max().item() < 0.6
    assert rllib[:, 6:].exp().mean().item() == pytest.approx(1.0, rel=0.1)
    assert torch.equal(ours[:, :6], rllib[:, :6])


def test_discrete_actions_and_the_default():
    """Atari's categorical policy has no log std: the option leaves it as RLlib builds it;
    continuous control starts at std 0.37 unless told otherwise."""
    with torch.no_grad():
        logits = _module(gym.spaces.Discrete(4), -1.0).forward_inference(
            {"obs": torch.randn(3, 17)})["action_dist_inputs"]
    assert logits.shape == (3, 4)
    assert PPOConfig().log_std_init == -1.0
