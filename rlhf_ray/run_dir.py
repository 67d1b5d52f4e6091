"""A run's folder, the same for both workloads.

    <run>/config.yaml                 the resolved config
    <run>/metrics.jsonl               one row per iteration (`metrics.py`); rows a killed run
    <run>/metrics.superseded.jsonl      wrote after its last checkpoint move here on resume
    <run>/tb/                         TensorBoard events
    <run>/checkpoints/iter_<N>/       every role's state + controller.json (the controller's)
    <run>/final/                      the LLM workload's last checkpoint
    <run>/preferences/                the preference store (or under run.storage_path's URI)
    <run>/labeling_url.txt            the labeling page with its token (mode 600)
    <run>/driver.log                  Ray's, RLlib's and Serve's own output (the CLI's default)

The run's name is `run.run_name`, else the folder's name, else one made up; with an `s3://` or
`gs://` `run.storage_path` the store lives at `<storage_path>/<name>/preferences`, so a run
resumed from its folder finds its labels again.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import numpy as np

from rlhf_ray.config import ConfigError, dump_config

CHECKPOINT_FORMAT = 1


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    raise TypeError(type(o))


class RunDir:
    def __init__(self, cfg, path: str | Path | None = None):
        self.workload = cfg.workload
        storage = cfg.run.storage_path
        self.name = cfg.run.run_name or (Path(path).name if path else None) or \
            f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
        remote = "://" in storage
        self.path = Path(path) if path else Path("runs" if remote else storage) / self.name
        self.store_root = (f"{storage.rstrip('/')}/{self.name}/preferences" if remote
                           else str(self.path / "preferences"))

    def __str__(self) -> str:
        return str(self.path)

    @property
    def log_path(self) -> Path:
        return self.path / "driver.log"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def create(self, cfg) -> None:
        """The folder, with the resolved config the run runs with."""
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "config.yaml").write_text(dump_config(cfg))

    def write_json(self, name: str, data: dict) -> Path:
        path = self.path / name
        path.write_text(json.dumps(data, indent=1))
        return path

    def write_private(self, name: str, text: str) -> Path:
        """A file only the owner reads (it carries a token)."""
        path = self.path / name
        path.write_text(text)
        os.chmod(path, 0o600)
        return path

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_dir(self, iteration: int, final: bool = False) -> Path:
        path = self.path / ("final" if final else f"checkpoints/iter_{iteration:06d}")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def write_state(self, ckpt: Path, state: dict) -> None:
        """The controller's part of a checkpoint, written last: a checkpoint counts once its
        controller.json exists."""
        state = {"format": CHECKPOINT_FORMAT, "workload": self.workload, **state}
        (Path(ckpt) / "controller.json").write_text(json.dumps(state, default=_json_default))

    def read_state(self, ckpt: str | Path) -> dict:
        """A checkpoint's controller.json; ConfigError (one line) when it is unreadable or of
        another format or workload."""
        try:
            state = json.loads((Path(ckpt) / "controller.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"checkpoint {ckpt}: unreadable controller.json ({exc})") from None
        if state.get("format") != CHECKPOINT_FORMAT or \
                state.get("workload", "control") != self.workload:
            raise ConfigError(f"checkpoint {ckpt}: format {state.get('format')!r} of workload "
                              f"{state.get('workload')!r}; this version reads format "
                              f"{CHECKPOINT_FORMAT} of the {self.workload} workload")
        return state

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint with a complete controller.json and the highest iteration
        (`final/` wins a tie)."""
        cands = sorted((self.path / "checkpoints").glob("iter_*"))
        best, best_it = None, -1
        for c in cands + [self.path / "final"]:
            if not (c / "controller.json").exists():
                continue
            try:
                it = int(json.loads((c / "controller.json").read_text()).get("iteration", 0))
            except (OSError, ValueError, AttributeError):
                it = int(c.name[5:]) if c.name.startswith("iter_") else 0
            if it >= best_it:
                best, best_it = c, it
        return best

    def resume_point(self, budget: tuple[str, str, int]) -> tuple[Path, dict]:
        """The checkpoint `--resume` continues from and its state. `budget`: (state key,
        config key, its value) that says when the run is complete. A missing, incompatible or
        complete run is refused with one line (ConfigError), the same for both workloads."""
        ckpt = self.latest_checkpoint()
        if ckpt is None:
            raise ConfigError(f"--resume {self.path}: no checkpoint with a controller.json "
                              "under checkpoints/ (run.checkpoint_every sets how often)")
        state = self.read_state(ckpt)
        key, cfg_key, limit = budget
        if int(state.get(key, 0)) >= limit:
            raise ConfigError(f"--resume {self.path}: the run is complete ({state[key]} {key} "
                              f">= {cfg_key}={limit}); raise {cfg_key} to go on")
        return ckpt, state

    # ------------------------------------------------------------------ metrics
    def truncate_metrics(self, iteration: int) -> None:
        """Rows the dead run wrote after its checkpoint move to metrics.superseded.jsonl: the
        resumed run writes those iterations again."""
        path = self.metrics_path
        if not path.exists():
            return
        keep, drop = [], []
        for line in path.read_text().splitlines():
            try:
                (keep if json.loads(line)["iteration"] <= iteration else drop).append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                drop.append(line)  # a line cut short by the kill
        if drop:
            with open(self.path / "metrics.superseded.jsonl", "a") as f:
                f.write("\n".join(drop) + "\n")
            path.write_text("".join(line + "\n" for line in keep))
