"""Loading a run's config: a packaged preset or a YAML file (a path, or a run folder's
`config.yaml` on object storage), `base:` inheritance, dotted ``key=value`` overrides, and
validation once by the workload the config names. The same object is what the CLI, ``ray
job submit`` entrypoints and Tune trials receive. Errors name the field, the bad value and
what is allowed; nothing is ever silently rewritten.

The schemas are each workload's own (`control/config.py`, `llm/config.py`) on the shared
sections (`runtime/sections.py`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from rlhf_ray import workloads
from rlhf_ray.errors import ConfigError
from rlhf_ray.storage import locations


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("rlhf_ray.presets").iterdir()
                  if p.name.endswith(".yaml"))


def preset_text(name: str) -> str:
    return resources.files("rlhf_ray.presets").joinpath(f"{name}.yaml").read_text()


def read_source(preset_or_path: str) -> dict[str, Any]:
    if preset_or_path.startswith("file://"):
        preset_or_path = preset_or_path[len("file://"):]
    path = Path(preset_or_path)
    if "://" in preset_or_path:  # a run folder's config.yaml on object storage
        try:
            text = locations.read_text(preset_or_path)
        except FileNotFoundError:
            raise ConfigError(f"config file {preset_or_path!r} does not exist") from None
        except OSError as exc:
            raise ConfigError(f"{preset_or_path}: cannot read ({str(exc).splitlines()[0]})") from None
    elif preset_or_path.endswith((".yaml", ".yml")) or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {preset_or_path!r} does not exist")
        text = path.read_text()
    elif preset_or_path in preset_names():
        text = preset_text(preset_or_path)
    else:
        raise ConfigError(
            f"unknown preset {preset_or_path!r}: choose one of {', '.join(preset_names())} "
            "or give a path to a YAML file"
        )
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{preset_or_path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{preset_or_path}: the top level must be a mapping")
    base = data.pop("base", None)
    if base is not None:
        data = deep_merge(read_source(str(base)), data)
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML scalars/flow collections."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. labels.budget=350")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {key}: {part!r} is not a section")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return data


def format_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key (check the spelling; `rlhf-ray presets --show NAME` lists keys)"
    if err["type"] == "value_error":
        return msg.removeprefix("Value error, ")
    return f"{loc}={err.get('input')!r}: {msg}"


def validate(data: dict[str, Any]):
    """The config of the workload `data` names (`workload:`; default the control workload),
    validated once: its schema, then the checks beyond it (an env id that exists)."""
    workload = workloads.named(data.get("workload"))
    try:
        cfg = workload.config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_error(exc)) from None
    workload.check(cfg)
    return cfg


def load_config(preset_or_path: str, overrides: list[str] | None = None):
    data = apply_overrides(read_source(preset_or_path), list(overrides or []))
    return validate(data)


def dump_config(cfg) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
