"""The seam between the shared layer and a workload: what a workload declares, as data, so
that the shared layer -- the config loader, `train`, sweeps, the labeling page, reports, the
CLI -- looks it up instead of asking which workload it serves (as verl maps roles to resource
pools, and imitation composes the pieces it is given).

Each workload's package declares one `Workload` in its `workload.py`; `rlhf_ray.workloads`
is the registry, by the config's `workload` key.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from rlhf_ray.runtime.metrics import MetricsTable
from rlhf_ray.runtime.placement import Placement


@dataclass(frozen=True)
class SharedStages:
    """Stages a sweep runs once and shares with every trial (the LLM's SFT and first reward
    model): `stages` for `train`, then each `override` key set to its folder under the
    shared run; `done`: the file whose presence says they ran."""

    stages: str
    overrides: dict[str, str]
    done: str


@dataclass(frozen=True)
class Workload:
    name: str
    config: type  # the config class (a pydantic model)
    # "module:Class" of its controller (a `RunController`): by path, because importing a
    # controller costs 2-3 s (torch, Ray Serve, RLlib; measured with -X importtime), which
    # the config checks, `rlhf-ray presets`, reports and the labeling command never need
    controller_path: str
    describe: Callable[[Any], str]  # one word or two for `rlhf-ray presets` (env id, model)
    placement: Callable[[Any], Placement]  # the run's roles -> resources
    query_kind: Callable[[Any], Any]  # a feedback.queries.QueryKind: what its labeler asks
    metrics: MetricsTable
    report: Callable[..., str]  # (run folder, rows, output) -> the report's PNG
    default_metric: str  # what a sweep optimizes unless told
    max_iterations: Callable[[Any], int]  # an upper bound for schedulers (ASHA's max_t)
    trial_settings: Callable[[Any], dict]  # the settings a PBT exploit may have mutated
    check: Callable[[Any], None] = lambda cfg: None  # checks beyond the schema
    # actors the labeling page needs beside the labeler (clip renderers):
    # (cfg, names, the labeler's namespace, store_root, nice, **actor options) -> actors
    page_helpers: Callable[..., list] | None = None
    stages: tuple[str, ...] = ()  # stages that also run alone (`rlhf-ray sft | rm | ppo`)
    shared_stages: Callable[[Any], SharedStages | None] = lambda cfg: None
    assets: Callable[[Any], list[str]] = lambda cfg: []  # packaged models and data it names

    def controller(self) -> type:
        """The controller class (imported on first use; see `controller_path`)."""
        module, _, name = self.controller_path.partition(":")
        return getattr(importlib.import_module(module), name)
