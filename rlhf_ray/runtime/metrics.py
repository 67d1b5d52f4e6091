"""Run metrics: one JSON line per iteration in `metrics.jsonl`, mirrored to TensorBoard.

Every key a controller writes is registered once, in its workload's `MetricsTable`
(`control/metrics.py`, `llm/metrics.py`), with the TensorBoard section it goes to (CleanRL's
split: `charts/` for what a run is judged by, `losses/` for the optimizer's view, then
`reward_model/`, `labels/`, `time/` and `counters/`). Keys both workloads write are defined
here (`SHARED`) and mean the same thing in both; a key is renamed only with its old name
written beside it for a release (`aliases`). Writing a key no table registers is an error
under `RLHF_RAY_STRICT_METRICS=1` (the test suite sets it), else it goes to `other/`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rlhf_ray.storage import locations

# what both workloads write
SHARED = {
    "iteration": "counters", "time_s": "time", "labeling_s": "time",
    "kl_mean": "losses",  # the KL the penalty acts on (control: old vs new policy per PPO
    "kl_coef": "losses",  # update, RLlib's; llm: policy vs the SFT reference per response)
    "labels_total": "labels", "labels_requested": "labels", "labels_pending": "labels",
    "labels_by_source": "labels", "labels_human": "labels", "labels_oracle": "labels",
    "labeler_restarts": "counters",
    "rm_version": "reward_model",  # the version behind the rewards PPO trained on
    "rm_version_published": "reward_model", "rm_val_accuracy": "reward_model",
    "rm_train_loss": "reward_model", "rm_train_s": "time",
}


@dataclass(frozen=True)
class MetricsTable:
    """One workload's metrics: every key with its TensorBoard section, the keys every row
    has, the progress line's columns (label, key, format), renamed keys (old -> new), the
    key TensorBoard steps by, and what the progress line adds at its end."""

    sections: dict[str, str]
    required: tuple[str, ...]
    progress: list[tuple[str, str, str]]
    step_key: str = "iteration"
    aliases: dict[str, str] = field(default_factory=dict)
    progress_suffix: Callable[[dict], str] = lambda row: ""

    def with_aliases(self, row: dict) -> dict:
        """The row with each renamed key also under its old name."""
        out = dict(row)
        for old, new in self.aliases.items():
            if new in row and old not in row:
                out[old] = row[new]
        return out

    def progress_line(self, m: dict) -> str:
        parts = []
        for label, key, spec in self.progress:
            v = m.get(key)
            parts.append(f"{label} {'-' if v is None else format(v, spec)}")
        return " | ".join(parts) + f" | {m.get('time_s', 0):.0f}s" + self.progress_suffix(m)

    def unregistered(self, row: dict) -> list[str]:
        return sorted(k for k in row if k not in self.sections and k not in self.aliases)


class PhaseTimer:
    """Wall time of one iteration's phases, by name (OpenRLHF's `timing/generate`, never list
    positions): `mark(name)` ends the phase that began at the previous mark (or at the
    start); `seconds()` gives each as `<name>_s`."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = now - self.last
        self.last = now

    def seconds(self) -> dict[str, float]:
        return {f"{name}_s": round(s, 3) for name, s in self.phases.items()}

    @property
    def total_s(self) -> float:
        """From the start to the last mark."""
        return self.last - self.start


def clean(x) -> float | None:
    """A metric value for JSON: None for missing, NaN or infinite, else rounded."""
    if x is None:
        return None
    x = float(x)
    return None if not math.isfinite(x) else round(x, 6)


def strict() -> bool:
    """Whether an unregistered key is an error (`RLHF_RAY_STRICT_METRICS=1`, the tests')."""
    return os.environ.get("RLHF_RAY_STRICT_METRICS", "") not in ("", "0")


class MetricsWriter:
    """Appends rows to `metrics.jsonl` and TensorBoard (`tb/`, each key in its registered
    section, aliases left out). A key the table does not register fails the write where
    `strict()`, else goes to `other/`."""

    def __init__(self, run_dir: Path, table: MetricsTable):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.table = table
        self.sections = table.sections
        self.aliases = set(table.aliases)
        self._f = open(self.path, "a", buffering=1)
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            self.tb = None

    def write(self, metrics: dict) -> None:
        unknown = self.table.unregistered(metrics)
        if unknown and strict():
            raise ValueError(f"metrics {', '.join(unknown)}: not registered in the workload's "
                             "MetricsTable (control/metrics.py, llm/metrics.py)")
        self._f.write(json.dumps(metrics) + "\n")
        if self.tb is None:
            return
        step_key = self.table.step_key
        step = int(metrics.get(step_key, metrics.get("iteration", 0)))
        for key, value in metrics.items():
            if key in self.aliases:
                continue
            tag = f"{self.sections.get(key, 'other')}/{key}"
            if isinstance(value, (int, float)) and key not in ("iteration", step_key):
                self.tb.add_scalar(tag, value, step)
            elif isinstance(value, dict):
                for k2, v2 in value.items():
                    if isinstance(v2, (int, float)):
                        self.tb.add_scalar(f"{tag}/{k2}", v2, step)
        self.tb.flush()  # the events are on disk before the folder is pushed

    def close(self) -> None:
        self._f.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """A run's rows, from its folder (a path or a URI)."""
    path = locations.join(locations.normalize(run_dir), "metrics.jsonl")
    try:
        text = locations.read_text(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a run folder?)") from None
    return [json.loads(line) for line in text.splitlines() if line.strip()]
