"""The env wrapper packs what the reward model and clips need into one info array."""

import numpy as np

from rlhf_ray.control.envs import INFO_KEY, make_env


def test_info_packs_raw_obs_and_mujoco_state_exactly():
    env = make_env({"id": "Hopper-v5", "kwargs": {"terminate_when_unhealthy": False}})
    layout = env.layout
    assert layout.obs_shape == (11,) and (layout.nq, layout.nv) == (6, 6)
    obs, info = env.reset(seed=3)
    for _ in range(5):
        obs, _, _, _, info = env.step(env.action_space.sample())
    got = layout.unpack(info[INFO_KEY][None])
    np.testing.assert_array_equal(got["obs"][0], obs.astype(np.float32))
    np.testing.assert_array_equal(got["state_qpos"][0], env.unwrapped.data.qpos)
    np.testing.assert_array_equal(got["state_qvel"][0], env.unwrapped.data.qvel)
    env.close()


def test_true_reward_baseline_copies_nothing_into_info():
    env = make_env({"id": "Hopper-v5", "_rlhf_info": False})
    assert env.layout is None
    _, info = env.reset(seed=0)
    _, _, _, _, info = env.step(env.action_space.sample())
    assert INFO_KEY not in info
    env.close()


def test_remove_termination_keeps_the_episode_going():
    env = make_env({"id": "Hopper-v5", "remove_termination": True, "_rlhf_info": False})
    env.reset(seed=0)
    for _ in range(300):  # a falling random Hopper terminates well before 300 steps
        _, _, terminated, truncated, _ = env.step(env.action_space.high)
        assert not terminated
    env.close()
