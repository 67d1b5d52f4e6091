"""Run metrics: one JSON line per iteration in `metrics.jsonl`, mirrored to TensorBoard.

The keys every control run writes (fixed here so tests, reports and Tune agree on them):
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONTROL_KEYS = ("iteration", "env_steps", "labels_total", "true_return_mean", "pred_return_mean",
                "rm_val_accuracy", "rm_version", "time_s")


def find_metric(result: dict, key: str) -> Any:
    """The value of `key` anywhere in RLlib's nested result dict (first found, depth-first)."""
    if key in result:
        return result[key]
    for value in result.values():
        if isinstance(value, dict):
            found = find_metric(value, key)
            if found is not None:
                return found
    return None


class MetricsWriter:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._f = open(self.path, "a", buffering=1)
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            self.tb = None

    def write(self, metrics: dict) -> None:
        self._f.write(json.dumps(metrics) + "\n")
        if self.tb is not None:
            step = int(metrics.get("env_steps", metrics.get("iteration", 0)))
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key not in ("iteration", "env_steps"):
                    self.tb.add_scalar(f"rlhf/{key}", value, step)
                elif isinstance(value, dict):
                    for k2, v2 in value.items():
                        if isinstance(v2, (int, float)):
                            self.tb.add_scalar(f"rlhf/{key}/{k2}", v2, step)

    def close(self) -> None:
        self._f.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a run folder?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
