"""The workloads, by the name a config gives in `workload:` (the control workload where it
gives none). The one place that names them: everything shared looks a workload up here and
uses what it declared (`rlhf_ray.runtime.workload.Workload`), never comparing names."""

from __future__ import annotations

from rlhf_ray.control.workload import WORKLOAD as CONTROL
from rlhf_ray.errors import ConfigError
from rlhf_ray.llm.workload import WORKLOAD as LLM
from rlhf_ray.runtime.workload import Workload

WORKLOADS: dict[str, Workload] = {w.name: w for w in (CONTROL, LLM)}
DEFAULT = CONTROL.name  # configs from before the LLM workload name none


def named(name: str | None) -> Workload:
    """The workload called `name` (None: the default); a ConfigError naming the choices."""
    name = DEFAULT if name is None else name
    if name not in WORKLOADS:
        raise ConfigError(f"workload={name!r}: choose one of {', '.join(WORKLOADS)}")
    return WORKLOADS[name]


def of(cfg) -> Workload:
    """The workload a validated config runs."""
    return WORKLOADS[cfg.workload]
