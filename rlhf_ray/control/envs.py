"""Environments for the control workload: any gymnasium id, plus what RLHF needs from it.

`make_env` builds the env an RLlib EnvRunner steps. On top of the plain env it
- applies the standard Atari preprocessing (84x84 grayscale, frame skip 4, 4 stacked frames)
  when `preprocessing: atari`;
- optionally removes termination (the paper's fixed-length episodes: the time limit ends them);
- puts into `info` what the reward model and clip rendering need and RLlib's connectors may
  rewrite or drop: the raw observation (`rlhf_obs`, before any observation filter) and the
  MuJoCo simulator state (`rlhf_qpos`, `rlhf_qvel`).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

ENV_NAME = "rlhf_ray_env"


def atari_to_uint8(obs: np.ndarray) -> np.ndarray:
    """RLlib's Atari wrapper emits float frames in [-1, 1); the reward model stores bytes."""
    return np.clip(np.rint((np.asarray(obs, dtype=np.float32) + 1.0) * 128.0), 0, 255).astype(np.uint8)


class RLHFInfo(gym.Wrapper):
    """Copies the raw observation and MuJoCo state into `info` every step."""

    def __init__(self, env: gym.Env, keep_obs: bool, remove_termination: bool):
        super().__init__(env)
        self.keep_obs = keep_obs
        self.remove_termination = remove_termination
        data = getattr(env.unwrapped, "data", None)
        self.mujoco = data is not None and hasattr(data, "qpos") and hasattr(data, "qvel")

    def _info(self, obs: Any, info: dict) -> dict:
        info = dict(info)
        if self.keep_obs:
            info["rlhf_obs"] = np.array(obs, dtype=np.float32, copy=True)
        if self.mujoco:
            data = self.env.unwrapped.data
            info["rlhf_qpos"] = np.array(data.qpos, dtype=np.float64, copy=True)
            info["rlhf_qvel"] = np.array(data.qvel, dtype=np.float64, copy=True)
        return info

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return obs, self._info(obs, info)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self.remove_termination:
            terminated = False
        return obs, reward, terminated, truncated, self._info(obs, info)


def lower_priority(nice: int) -> None:
    """Add `nice` to this process's niceness, once per process (batch roles call it)."""
    global _NICED
    if nice and not _NICED:
        import os

        os.nice(int(nice))
        _NICED = True


_NICED = False


def make_env(env_config: dict) -> gym.Env:
    """env_config: `EnvConfig.model_dump()`, plus `_nice` (rollout workers' priority)."""
    lower_priority(int(env_config.get("_nice") or 0))
    env_id = env_config["id"]
    kwargs = dict(env_config.get("kwargs") or {})
    atari = env_config.get("preprocessing") == "atari"
    if env_id.startswith("ALE/"):
        import ale_py

        gym.register_envs(ale_py)
    if atari:
        from ray.rllib.env.wrappers.atari_wrappers import wrap_atari_for_new_api_stack

        kwargs.setdefault("frameskip", 1)  # the wrapper skips frames itself (max over 4)
        env = gym.make(env_id, **kwargs)
        env = wrap_atari_for_new_api_stack(env, dim=84, frameskip=4, framestack=4)
    else:
        env = gym.make(env_id, **kwargs)
    if env_config.get("max_episode_steps"):
        env = gym.wrappers.TimeLimit(env, max_episode_steps=int(env_config["max_episode_steps"]))
    return RLHFInfo(env, keep_obs=not atari,
                    remove_termination=bool(env_config.get("remove_termination")))


def env_dt(env_config: dict) -> float:
    """Simulated seconds per env step (MuJoCo `dt`; 1/15 for Atari at frame skip 4)."""
    if env_config.get("preprocessing") == "atari":
        return 4 / 60
    env = make_env(env_config)
    try:
        return float(getattr(env.unwrapped, "dt", 0.05))
    finally:
        env.close()


def spaces(env_config: dict) -> tuple[gym.Space, gym.Space]:
    env = make_env(env_config)
    try:
        return env.observation_space, env.action_space
    finally:
        env.close()


def register() -> None:
    from ray.tune.registry import register_env

    register_env(ENV_NAME, make_env)
