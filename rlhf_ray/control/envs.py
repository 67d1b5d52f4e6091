"""Environments for the control workload: any gymnasium id, plus what RLHF needs from it.

`make_env` builds the env an RLlib EnvRunner steps. On top of the plain env it
- applies the standard Atari preprocessing (84x84 grayscale, frame skip 4 with max pooling,
  up to 30 no-ops at reset, FIRE at reset where the game needs it, 4 stacked frames) when
  `preprocessing: atari`; a lost life ends an episode only with `episodic_life` (the paper's
  agents were not told about lives);
- optionally removes termination (the paper's fixed-length episodes: the time limit ends them).
  An Atari game cannot go on after game over, so there termination becomes truncation: the
  game restarts and PPO bootstraps through the end as through a time limit, so the agent is
  not told that the game ended (Christiano et al. 2017, appendix A.2);
- puts into `info` what the reward model and clip rendering need and RLlib's connectors may
  rewrite or drop: the raw observation (before any observation filter) and the MuJoCo
  simulator state (qpos, qvel), packed into ONE float64 array under `info["rlhf"]`
  (`InfoLayout` unpacks it). One array per step instead of three: RLlib copies and pickles
  every info, and this was measured at half the sampling overhead of the RLHF loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from rlhf_ray.runtime.actors import lower_priority

ENV_NAME = "rlhf_ray_env"

# Where each game shows its score in the 84x84 preprocessed frames: [row0, row1, col0, col1)
# boxes the CNN reward model sees blank. Measured on ALE frames through `make_env` (the rows
# whose pixels change when a point is scored; tests/unit/test_atari.py checks Pong's).
ATARI_SCORE_AREAS: dict[str, list[tuple[int, int, int, int]]] = {
    "Pong": [(0, 10, 0, 84)],  # both scores in rows 0-8, above the top wall (rows 9-12)
}


def atari_game(env_id: str) -> str:
    """'ALE/Pong-v5' -> 'Pong', 'PongNoFrameskip-v4' -> 'Pong'."""
    name = env_id.split("/")[-1].split("-v")[0]
    for suffix in ("NoFrameskip", "Deterministic"):
        name = name.removesuffix(suffix)
    return name


def atari_score_area(env_id: str) -> list[tuple[int, int, int, int]]:
    game = atari_game(env_id)
    if game not in ATARI_SCORE_AREAS:
        raise ValueError(f"no known score area for {env_id!r}: set reward_model.score_area")
    return list(ATARI_SCORE_AREAS[game])


def wrap_atari(env: gym.Env, episodic_life: bool = False) -> gym.Env:
    """RLlib's Atari preprocessing (`wrap_atari_for_new_api_stack` at dim 84, frame skip 4,
    4 stacked frames), with the lost-life episode end optional."""
    from ray.rllib.env.wrappers.atari_wrappers import (
        EpisodicLifeEnv,
        FireResetEnv,
        FrameStack,
        MaxAndSkipEnv,
        NoopResetEnv,
        NormalizedImageEnv,
        WarpFrame,
    )

    env = gym.wrappers.TimeLimit(env, max_episode_steps=108_000)
    env = NormalizedImageEnv(WarpFrame(env, dim=84, grayscale=True))
    env = NoopResetEnv(MaxAndSkipEnv(env, skip=4), noop_max=30)
    if episodic_life:
        env = EpisodicLifeEnv(env)
    if "FIRE" in env.unwrapped.get_action_meanings():
        env = FireResetEnv(env)
    return FrameStack(env, k=4)


def atari_to_uint8(obs: np.ndarray) -> np.ndarray:
    """RLlib's Atari wrapper emits float frames in [-1, 1); the reward model stores bytes."""
    return np.clip(np.rint((np.asarray(obs, dtype=np.float32) + 1.0) * 128.0), 0, 255).astype(np.uint8)


INFO_KEY = "rlhf"


@dataclass(frozen=True)
class InfoLayout:
    """Where the raw observation, qpos and qvel lie in the packed `info["rlhf"]` array."""

    obs_shape: tuple[int, ...]
    nq: int = 0
    nv: int = 0

    def unpack(self, packed: np.ndarray) -> dict[str, np.ndarray]:
        """packed: [T, obs_size + nq + nv] float64 -> {"obs" float32 [T, *obs_shape],
        and "state_qpos" [T, nq], "state_qvel" [T, nv] when the env is MuJoCo}."""
        t = packed.shape[0]
        n_obs = int(np.prod(self.obs_shape))
        out = {"obs": packed[:, :n_obs].astype(np.float32).reshape(t, *self.obs_shape)}
        if self.nq:
            out["state_qpos"] = packed[:, n_obs:n_obs + self.nq].copy()
            out["state_qvel"] = packed[:, n_obs + self.nq:n_obs + self.nq + self.nv].copy()
        return out


class RLHFInfo(gym.Wrapper):
    """Packs the raw observation and MuJoCo state into `info["rlhf"]` every step."""

    def __init__(self, env: gym.Env, keep_obs: bool, remove_termination: bool,
                 restart_on_termination: bool = False):
        super().__init__(env)
        self.keep_obs = keep_obs
        self.remove_termination = remove_termination
        self.restart = restart_on_termination  # a game that cannot go on: truncate instead
        data = getattr(env.unwrapped, "data", None)
        self.mujoco = data is not None and hasattr(data, "qpos") and hasattr(data, "qvel")

    @property
    def layout(self) -> InfoLayout | None:
        if not self.keep_obs:
            return None
        data = self.env.unwrapped.data if self.mujoco else None
        return InfoLayout(tuple(self.observation_space.shape),
                          len(data.qpos) if data is not None else 0,
                          len(data.qvel) if data is not None else 0)

    def _info(self, obs: Any, info: dict) -> dict:
        if not self.keep_obs:
            return info
        info = dict(info)
        if self.mujoco:
            data = self.env.unwrapped.data
            info[INFO_KEY] = np.concatenate([np.ravel(obs), data.qpos, data.qvel], dtype=np.float64)
        else:
            info[INFO_KEY] = np.array(obs, dtype=np.float64).ravel()
        return info

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return obs, self._info(obs, info)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self.remove_termination and terminated:
            terminated, truncated = False, truncated or self.restart
        return obs, reward, terminated, truncated, self._info(obs, info)


def make_env(env_config: dict) -> gym.Env:
    """env_config: `EnvConfig.model_dump()`, plus `_nice` (rollout workers' priority) and
    `_rlhf_info` (False for the true-reward baseline: plain PPO copies nothing into `info`)."""

    lower_priority(int(env_config.get("_nice") or 0))
    env_id = env_config["id"]
    kwargs = dict(env_config.get("kwargs") or {})
    atari = env_config.get("preprocessing") == "atari"
    if env_id.startswith("ALE/"):
        import ale_py

        gym.register_envs(ale_py)
    if atari:
        kwargs.setdefault("frameskip", 1)  # the wrapper skips frames itself (max over 4)
        env = wrap_atari(gym.make(env_id, **kwargs), bool(env_config.get("episodic_life")))
    else:
        env = gym.make(env_id, **kwargs)
    if env_config.get("max_episode_steps"):
        env = gym.wrappers.TimeLimit(env, max_episode_steps=int(env_config["max_episode_steps"]))
    rlhf_info = bool(env_config.get("_rlhf_info", True))
    return RLHFInfo(env, keep_obs=rlhf_info and not atari,
                    remove_termination=bool(env_config.get("remove_termination")),
                    restart_on_termination=atari)


@dataclass(frozen=True)
class EnvProbe:
    """What a run needs to know about its env before anything starts, from one instance:
    spaces, simulated seconds per step, how `info["rlhf"]` is packed (None for Atari), and
    the bounds of a Box action space (None otherwise)."""

    observation_space: gym.Space
    action_space: gym.Space
    dt: float
    layout: InfoLayout | None
    action_bounds: tuple[np.ndarray, np.ndarray] | None


def probe(env_config: dict) -> EnvProbe:
    """Build the env once and read what the run's set-up needs (MuJoCo `dt`; 1/15 s for
    Atari at frame skip 4)."""
    env = make_env(env_config)
    try:
        act = env.action_space
        bounds = ((act.low.astype(np.float32), act.high.astype(np.float32))
                  if isinstance(act, gym.spaces.Box) else None)
        dt = 4 / 60 if env_config.get("preprocessing") == "atari" else \
            float(getattr(env.unwrapped, "dt", 0.05))
        return EnvProbe(env.observation_space, act, dt, env.layout, bounds)
    finally:
        env.close()


def register() -> None:
    from ray.tune.registry import register_env

    register_env(ENV_NAME, make_env)
