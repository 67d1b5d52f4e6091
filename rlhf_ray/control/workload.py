"""The control workload as the shared layer sees it (`rlhf_ray.runtime.workload`): its config,
controller, roles and their resources, query kind (clip pairs), metrics and report."""

from __future__ import annotations

import ale_py
import gymnasium as gym

from rlhf_ray.control import labeling, report
from rlhf_ray.control.config import ControlConfig
from rlhf_ray.control.metrics import CONTROL
from rlhf_ray.errors import ConfigError
from rlhf_ray.runtime.workload import Workload


def check(cfg: ControlConfig) -> None:
    """The env id is a registered gymnasium env (Atari's registered first)."""
    if cfg.env.id.startswith("ALE/"):
        gym.register_envs(ale_py)
    try:
        gym.spec(cfg.env.id)
    except Exception:  # gymnasium raises several error types for unknown ids
        raise ConfigError(f"env.id={cfg.env.id!r}: not a registered gymnasium env (e.g. "
                          "Hopper-v5, ALE/Pong-v5)") from None


WORKLOAD = Workload(
    name="control",
    config=ControlConfig,
    controller_path="rlhf_ray.control.loop:ControlController",
    describe=lambda cfg: cfg.env.id,
    placement=lambda cfg: cfg.placement.roles(),
    query_kind=labeling.query_kind,
    metrics=CONTROL,
    report=report.report,
    default_metric="true_return_mean",
    max_iterations=lambda cfg: 10_000,
    trial_settings=lambda cfg: {"ppo": cfg.ppo.model_dump(mode="json")},
    check=check,
    page_helpers=labeling.clip_renderers,
)
