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

The folder is a location (`rlhf_ray.storage`): a local path or an `s3://` / `gs://` URI, given
by `--run-dir`, else `<run.storage_path>/<run name>`. The run's name is `run.run_name`, else
the folder's name, else one made up. Roles write their parts of a checkpoint (and the LLM
stages their models) straight to the location, from whatever node they run on; the driver
keeps a local working copy of what it writes itself (config, metrics, TensorBoard, the driver
log, samples, reports) and pushes it after every iteration and checkpoint. A remote run is
resumed, reported on and labeled from its URI by any job on any node.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import numpy as np
import yaml

from rlhf_ray.errors import ConfigError
from rlhf_ray.storage import locations

CHECKPOINT_FORMAT = 1
# written by the roles straight to the location (never through the driver's working copy)
ROLE_WRITTEN = ("checkpoints", "final", "preferences", "sft", "reward_model")


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    raise TypeError(type(o))


class RunDir:
    def __init__(self, cfg, path: str | Path | None = None):
        self.workload = cfg.workload
        given = locations.normalize(path) if path else None
        self.name = cfg.run.run_name or (locations.name(given) if given else None) or \
            f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
        self.uri = given or locations.join(locations.normalize(cfg.run.storage_path), self.name)
        self.remote = locations.is_remote(self.uri)
        if self.remote:  # this process's working copy of the files the driver writes itself
            import tempfile

            parent = locations.cache_root().parent / "runs"
            parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=parent))
            self.mirror = locations.Mirror(self.path, self.uri, exclude=ROLE_WRITTEN)
        else:
            self.path, self.mirror = Path(self.uri), None
        self.store_root = locations.join(self.uri, "preferences")

    def __str__(self) -> str:
        return self.uri

    def loc(self, *parts: str) -> str:
        """A location under the run folder (a path, or a URI for a remote run)."""
        return locations.join(self.uri, *parts)

    @property
    def log_path(self) -> Path:
        return self.path / "driver.log"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def check(self) -> None:
        """Refuse a location the run cannot write to (one line), before anything starts."""
        locations.check(self.uri, "run folder")

    def create(self, cfg) -> None:
        """The folder, with the resolved config the run runs with."""
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "config.yaml").write_text(  # as `rlhf_ray.config.dump_config`
            yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        self.sync()

    def pull(self) -> None:
        """A remote run's own files (config, metrics, TensorBoard, samples) into the working
        copy: a resumed run appends to them, a report draws them."""
        if self.mirror is not None:
            self.path.mkdir(parents=True, exist_ok=True)
            self.mirror.pull(skip=ROLE_WRITTEN)

    def sync(self) -> None:
        """The working copy's new and changed files to the remote location."""
        if self.mirror is not None:
            self.mirror.push()

    def close(self) -> None:
        """A remote run's last push; its working copy is removed once everything is there."""
        if self.mirror is not None and self.path.exists():
            import shutil

            self.mirror.push()
            shutil.rmtree(self.path, ignore_errors=True)

    def write_json(self, name: str, data: dict) -> Path:
        path = self.path / name
        path.write_text(json.dumps(data, indent=1))
        self.sync()
        return path

    def write_private(self, name: str, text: str) -> Path:
        """A file only the owner reads (it carries a token)."""
        path = self.path / name
        path.write_text(text)
        os.chmod(path, 0o600)
        self.sync()
        return path

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_dir(self, iteration: int, final: bool = False) -> str:
        """Where a checkpoint's parts go (local: created)."""
        loc = self.loc("final" if final else f"checkpoints/iter_{iteration:06d}")
        if not self.remote:
            os.makedirs(loc, exist_ok=True)
        return loc

    def write_state(self, ckpt: str, state: dict) -> None:
        """The controller's part of a checkpoint, written last: a checkpoint counts once its
        controller.json exists."""
        state = {"format": CHECKPOINT_FORMAT, "workload": self.workload, **state}
        locations.write_text(locations.join(str(ckpt), "controller.json"),
                           json.dumps(state, default=_json_default))
        self.sync()

    def read_state(self, ckpt: str | Path) -> dict:
        """A checkpoint's controller.json; ConfigError (one line) when it is unreadable or of
        another format or workload."""
        try:
            state = json.loads(locations.read_text(locations.join(str(ckpt), "controller.json")))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"checkpoint {ckpt}: unreadable controller.json ({exc})") from None
        if state.get("format") != CHECKPOINT_FORMAT or \
                state.get("workload") != self.workload:
            raise ConfigError(f"checkpoint {ckpt}: format {state.get('format')!r} of workload "
                              f"{state.get('workload')!r}; this version reads format "
                              f"{CHECKPOINT_FORMAT} of the {self.workload} workload")
        return state

    def latest_checkpoint(self) -> str | None:
        """The checkpoint with a complete controller.json and the highest iteration
        (`final/` wins a tie)."""
        cands = [self.loc("checkpoints", n) for n in locations.listdir(self.loc("checkpoints"))
                 if n.startswith("iter_")]
        best, best_it = None, -1
        for c in cands + [self.loc("final")]:
            try:
                text = locations.read_text(locations.join(c, "controller.json"))
            except OSError:
                continue
            try:
                it = int(json.loads(text).get("iteration", 0))
            except (ValueError, AttributeError):
                base = locations.name(c)
                it = int(base[5:]) if base.startswith("iter_") else 0
            if it >= best_it:
                best, best_it = c, it
        return best

    def resume_point(self, budget: tuple[str, str, int]) -> tuple[str | None, dict | None]:
        """The checkpoint `--resume` continues from and its state; (None, None) for a run
        killed before its first checkpoint (its labels are in the store: the learners start
        afresh on them). `budget`: (state key, config key, its value) that says when the run
        is complete. An incompatible or complete run is refused with one line (ConfigError),
        the same for both workloads."""
        if not locations.is_file(self.loc("config.yaml")):
            raise ConfigError(f"--resume {self.uri}: not a run folder (no config.yaml)")
        ckpt = self.latest_checkpoint()
        if ckpt is None:
            return None, None
        state = self.read_state(ckpt)
        key, cfg_key, limit = budget
        if int(state.get(key, 0)) >= limit:
            raise ConfigError(f"--resume {self.uri}: the run is complete ({state[key]} {key} "
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
