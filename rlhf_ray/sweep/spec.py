"""A sweep file: a base preset (or YAML), overrides for every trial, a search space of dotted
config keys, a scheduler (FIFO, ASHA, PBT), the metric and mode, trials and concurrency;
validated once, with every trial's config checked before anything starts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from rlhf_ray.config import apply_overrides, read_source, validate
from rlhf_ray.errors import ConfigError
from rlhf_ray.runtime.sections import Strict


class SchedulerConfig(Strict):
    kind: Literal["fifo", "asha", "pbt"] = "fifo"
    grace_period: int = Field(3, ge=1, description="asha: iterations before a trial can stop")
    reduction_factor: float = Field(2.0, gt=1, description="asha")
    perturbation_interval: int = Field(5, ge=1, description="pbt: iterations between exploits")
    quantile_fraction: float = Field(0.25, gt=0, le=0.5, description="pbt")
    resample_probability: float = Field(0.25, ge=0, le=1, description="pbt")
    synch: bool = Field(False, description="pbt: Tune's synchronous PBT; every trial waits at "
                        "each perturbation step until all have reached it, so trials that run "
                        "at different speeds are still ranked against each other")


class SweepConfig(Strict):
    name: str = "sweep"
    description: str = ""
    base: str = Field(description="preset name or YAML path every trial starts from")
    overrides: list[str] = Field(default_factory=list, description="key=value for every trial")
    space: dict[str, dict[str, Any]] = Field(
        description="dotted key -> {grid: [..]} | {choice: [..]} | {uniform: [lo, hi]} | "
        "{loguniform: [lo, hi]}")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    metric: str | None = Field(None, description="default: oracle_score_mean (llm), "
                               "true_return_mean (control)")
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(1, ge=1, description="samples of the space (each grid point x this)")
    initial_points: list[dict[str, Any]] = Field(
        default_factory=list, description="trials to run first, each a {dotted key: value} "
        "point of the space (Tune's points_to_evaluate); the rest are sampled")
    seed: int | None = Field(None, description="seed of the search's sampling (reproducible "
                             "trial values)")
    max_concurrent_trials: int = Field(1, ge=1)
    storage_path: str = Field("sweeps", description="local folder or s3:// / gs:// URI")
    shared_stages: bool = Field(
        True, description="llm: run SFT and the first reward model once, shared by all trials")

    @model_validator(mode="after")
    def _check(self) -> "SweepConfig":
        kinds = {"grid", "choice", "uniform", "loguniform"}
        for key, dom in self.space.items():
            if len(dom) != 1 or next(iter(dom)) not in kinds:
                raise ValueError(f"space.{key}={dom!r}: use one of {{grid|choice: [..]}}, "
                                 "{uniform|loguniform: [lo, hi]}")
            kind, vals = next(iter(dom.items()))
            if not isinstance(vals, list) or not vals:
                raise ValueError(f"space.{key}.{kind}: needs a non-empty list")
            if kind in ("uniform", "loguniform") and (len(vals) != 2 or not vals[0] < vals[1]
                                                      or (kind == "loguniform" and vals[0] <= 0)):
                raise ValueError(f"space.{key}.{kind}={vals}: needs [low, high] with "
                                 f"{'0 < ' if kind == 'loguniform' else ''}low < high")
        for i, point in enumerate(self.initial_points):
            unknown = sorted(set(point) - set(self.space))
            if unknown:
                raise ValueError(f"initial_points[{i}]: {', '.join(unknown)} not in space "
                                 f"(space keys: {', '.join(self.space)})")
        if self.initial_points and any("grid" in d for d in self.space.values()):
            raise ValueError("initial_points: not with grid domains (a grid runs every point)")
        if self.scheduler.kind == "pbt" and any("grid" in d for d in self.space.values()):
            raise ValueError("scheduler.kind=pbt: PBT mutates sampled values; use choice, "
                             "uniform or loguniform, not grid")
        return self


def load_sweep(path: str, overrides: list[str] | None = None) -> SweepConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file {path!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    trial_overrides = []
    for item in overrides or []:  # sweep.* keys change the sweep; others go to every trial
        if item.startswith("sweep."):
            data = apply_overrides(data, [item[len("sweep."):]])
        else:
            trial_overrides.append(item)
    data["overrides"] = list(data.get("overrides") or []) + trial_overrides
    try:
        cfg = SweepConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"{path}: {loc}: unknown key") from None
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{path}: {msg}" if err["type"] == "value_error"
                          else f"{path}: {loc}={err.get('input')!r}: {msg}") from None
    base = Path(path).parent / cfg.base
    if cfg.base.endswith((".yaml", ".yml")) and base.is_file():
        cfg.base = str(base)
    # every trial's config must validate: check the base, one point of the space and the
    # initial points now
    trial_config(cfg, {k: first(v) for k, v in cfg.space.items()})
    for point in cfg.initial_points:
        trial_config(cfg, {**{k: first(v) for k, v in cfg.space.items()}, **point})
    return cfg


def first(dom: dict) -> Any:
    kind, vals = next(iter(dom.items()))
    return vals[0]


def trial_config(sweep: SweepConfig, params: dict[str, Any]):
    data = apply_overrides(read_source(sweep.base), list(sweep.overrides))
    data = apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in params.items()])
    return validate(data)
