"""What both controllers share, so each holds only its paper's loop: the run folder and
its config, Ray joined or started, one metrics row per iteration (file, TensorBoard, the
caller's callback, the progress line), the controller's part of a checkpoint, resuming, the
stop event, and stopping every role the run started.

`control.loop.ControlController` (Christiano et al. 2017) and `llm.loop.LLMController`
(InstructGPT) subclass `RunController`; `rlhf_ray.train.train` takes the one the config's
workload declares.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import ray
from ray.util import remove_placement_group

from rlhf_ray.runtime import console
from rlhf_ray.runtime.actors import kill_all
from rlhf_ray.runtime.cluster import init_ray
from rlhf_ray.runtime.metrics import MetricsTable, MetricsWriter
from rlhf_ray.runtime.names import RoleNames
from rlhf_ray.runtime.placement import (
    Placement,
    PlacementPlan,
    placement_plan,
    start_group,
)
from rlhf_ray.runtime.run_dir import RunDir
from rlhf_ray.runtime.serving import delete_app


class RunController:
    """`run()` is the loop (in the subclass); the rest is bookkeeping both loops need. A
    subclass names its metrics (`metrics_table`) and when a run is complete (`budget`)."""

    metrics_table: MetricsTable

    def __init__(self, cfg, run_dir: str | Path | RunDir | None = None,
                 on_metrics: Callable[[dict], None] | None = None, progress: bool = True,
                 stop_event=None, run_id: str | None = None, plan: PlacementPlan | None = None):
        self.cfg = cfg
        self.folder = run_dir if isinstance(run_dir, RunDir) else RunDir(cfg, run_dir)
        self.on_metrics = on_metrics
        self.progress = progress
        self.stop_event = stop_event  # a threading.Event: set it to end after this iteration
        self.run_id = run_id or uuid.uuid4().hex[:8]
        self.names = RoleNames(self.run_id, cfg.workload)
        self.plan = plan  # a Tune trial's placement plan (its group is the current one)
        self.pg = None  # the placement group this run made (placement.group_strategy)
        self.rng = np.random.default_rng(cfg.seed)
        self.iteration = 0
        self.feedback = None  # rlhf_ray.feedback.Feedback, where labels are learned from
        self.actors: list = []  # every actor this run started, stopped at the end
        self.apps: list[str] = []  # every Serve application likewise
        self.t_start = time.time()
        self.resume_own = True  # a checkpoint of this run (False: a Tune trial given another's)
        self.young_resume = False  # --resume of a run killed before its first checkpoint
        self._writer: MetricsWriter | None = None

    @property
    def run_dir(self) -> Path:
        return self.folder.path

    @staticmethod
    def budget(cfg) -> tuple[str, str, int]:
        """(checkpoint key, config key, value): when the run is complete."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the run's life
    @contextmanager
    def session(self):
        """The run folder with its config, Ray (joined, or started and stopped here), and at
        the end every role this run started stopped, whatever happened."""
        self.folder.create(self.cfg)
        if self.young_resume:  # every row the dead run wrote is written again
            self.folder.truncate_metrics(0)
        started = init_ray(self.cfg)
        if self.resume_own:
            self.remove_dead_apps()
        self.t_start = time.time()
        try:
            yield
        finally:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            try:
                self.stop()
            finally:
                self.folder.sync()
            if started:
                ray.shutdown()

    def remove_dead_apps(self) -> None:
        """The Serve applications earlier processes of this run folder left running (a killed
        run's reward model and labeling page hold their replicas' CPUs until removed; a run
        killed before its first checkpoint names its id nowhere else): every run id is kept in
        `run_ids.json`."""
        path = self.folder.path / "run_ids.json"
        ids = json.loads(path.read_text()) if path.exists() else []
        for old in ids:
            if old != self.run_id:
                dead = RoleNames(old, self.cfg.workload)
                for app in (dead.reward_app, dead.label_app):
                    delete_app(app)
        path.write_text(json.dumps([i for i in ids if i != self.run_id] + [self.run_id]))
        self.folder.sync()

    def stop(self) -> None:
        if self.feedback is not None:
            self.feedback.stop()
        for app in self.apps:
            delete_app(app)
        kill_all(self.actors)
        self.actors, self.apps = [], []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = self.plan = None

    def log(self, msg: str) -> None:
        if self.progress:
            console.note(msg)

    def should_stop(self) -> bool:
        return bool(self.stop_event is not None and self.stop_event.is_set())

    def emit(self, m: dict) -> dict:
        """One iteration's row: metrics.jsonl and TensorBoard, the caller's callback, the
        progress line."""
        table = self.metrics_table
        row = table.with_aliases(m)
        if self._writer is None:
            self._writer = MetricsWriter(self.run_dir, table)
        self._writer.write(row)
        self.folder.sync()
        if self.on_metrics:
            self.on_metrics(row)
        if self.progress:
            console.progress(table.progress_line(row))
        return row

    def elapsed_s(self) -> float:
        return round(time.time() - self.t_start, 3)

    # ------------------------------------------------------------------ checkpoints
    def save_state(self, path: str, state: dict) -> str:
        """The controller's part of a checkpoint (the roles' parts are already in `path`)."""
        if self.feedback is not None:
            state = {**self.feedback.state(), **state}
        self.folder.write_state(path, {"iteration": self.iteration, "run_id": self.run_id,
                                       "rng": self.rng.bit_generator.state, **state})
        return path

    def load_state(self, ckpt: str) -> dict:
        """The controller's part of a checkpoint: iteration and RNG here, the rest returned.
        Rows the dead run wrote after it are superseded, and the Serve applications it left
        running are removed."""
        state = self.folder.read_state(ckpt)
        self.iteration = int(state["iteration"])
        self.rng.bit_generator.state = state["rng"]
        if not self.resume_own:
            return state
        self.folder.truncate_metrics(self.iteration)
        old = state.get("run_id")
        if old and old != self.run_id:
            dead = RoleNames(old, self.cfg.workload)
            for app in (dead.reward_app, dead.label_app):
                delete_app(app)
        return state

    def start_group(self, placement: Placement, strategy: str | None, timeout_s: float) -> None:
        """`placement.group_strategy`: one placement group for the run's role actors, each in
        its own bundle (a Tune trial brings its own group and plan instead)."""
        if strategy is None or self.plan is not None:
            return
        plan = placement_plan(placement, driver={"CPU": 0.01})  # the driver is not in it
        self.pg = start_group(plan, strategy, timeout_s, self.names.group)
        self.plan = plan

    def bundle(self, role: str, i: int = 0) -> int | None:
        return self.plan.bundle(role, i) if self.plan is not None else None
