"""One trial of a sweep: the real loop of the config's workload -- rollout or generation
workers, reward model, labeler, learner -- inside the trial's placement group, reporting every
iteration's metrics to Tune, and checkpointing through Tune.

PBT exploit hands a trial its donor's whole state: the checkpoint holds the controller's and
every role's state and a copy of the preference store, so the clone continues from where its
donor was (with the mutated settings: the workload names them, `trial_settings`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from ray import tune

from rlhf_ray import workloads
from rlhf_ray.runtime.names import APP_PREFIXES
from rlhf_ray.runtime.placement import placement_plan
from rlhf_ray.runtime.serving import delete_app, serve_apps
from rlhf_ray.storage import locations
from rlhf_ray.sweep.spec import SweepConfig, trial_config


def _cleanup_serve(trial_id: str) -> None:
    for name in serve_apps():
        if name.endswith(trial_id) and name.startswith(APP_PREFIXES):
            delete_app(name)


def run_trial(config: dict, spec: dict) -> None:
    """The Tune trainable: the real loop of the config's workload, one trial. Its checkpoints
    are Tune's (the controller's whole state and the label store; `_trial_checkpoint_every`),
    so PBT exploits copy the whole state and an interrupted sweep resumes each trial where it
    stopped."""
    sweep = SweepConfig.model_validate(spec["sweep"])
    params = {k: config[k] for k in sweep.space}
    cfg = trial_config(sweep, {**params, **spec.get("shared", {})})  # a fresh one: ours
    workload = workloads.of(cfg)
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    run_dir = Path(ctx.get_trial_dir()) / "run"
    _cleanup_serve(trial_id)  # an earlier incarnation of this trial (PBT exploit, restore)
    pbt_every = sweep.scheduler.perturbation_interval if sweep.scheduler.kind == "pbt" else 0
    every = _trial_checkpoint_every(pbt_every, cfg)
    cfg.run.checkpoint_every = 0  # checkpoints here are Tune's
    ctl = workload.controller()(cfg, str(run_dir), progress=False, run_id=trial_id,
                                plan=placement_plan(workload.placement(cfg)))
    # the checkpoint may be another trial's (a PBT donor, still running): its applications
    # stay up, and this trial's rows stay (restores.jsonl says where each incarnation begins)
    ctl.resume_own = False
    ctl.on_metrics = _report_with_checkpoint(ctl, run_dir, every)
    shared_root = spec.get("shared_root")
    shared_prefs = locations.join(shared_root, "preferences") if shared_root else None
    if shared_prefs is not None and locations.is_dir(shared_prefs) and \
            not (run_dir / "preferences").exists():
        # trials start from the shared stages' reward model and the labels it was fitted on
        locations.download_dir(shared_prefs, run_dir / "preferences")
    # a PBT exploit hands over the donor's checkpoint with mutated settings: the resumed
    # controller takes the new ones (it compares them with the checkpoint's)
    ctl.run(resume_from=_restore_from_tune(run_dir, workload.trial_settings(cfg)))


def _trial_checkpoint_every(pbt_every: int, cfg) -> int:
    """How often a trial checkpoints through Tune: the config's `run.checkpoint_every`, or
    PBT's perturbation interval where that is sooner (an exploit takes the donor's newest
    checkpoint; checkpointing every iteration makes one always exist, whichever trial is
    faster)."""
    own = cfg.run.checkpoint_every
    return min(pbt_every, own) if pbt_every and own else (pbt_every or own)


def _report_with_checkpoint(ctl, run_dir: Path, every: int):
    """The trial's on_metrics: every row to Tune; every `every` iterations with a checkpoint
    of the whole state (the controller's own, plus the label store: its position travels
    with the checkpoint, so a PBT clone continues with its donor's labels)."""

    def report(m: dict) -> None:
        flat = {k: v for k, v in m.items() if isinstance(v, (int, float)) and v is not None}
        if every and m["iteration"] % every == 0:
            # out of the run folder before Tune sees it: Tune's artifact sync uploads the
            # whole run folder at every checkpoint, so checkpoints left there were uploaded
            # again at every later one (the control PBT test on S3: 383 s before, 191 s
            # after); Tune keeps its own copy of each
            staged = Path(tempfile.mkdtemp(prefix="rlhf-trial-ckpt-")) / "checkpoint"
            shutil.move(ctl.checkpoint(), staged)
            try:
                prefs = run_dir / "preferences"
                if prefs.exists():
                    shutil.copytree(prefs, staged / "preferences", dirs_exist_ok=True)
                tune.report(flat, checkpoint=tune.Checkpoint.from_directory(str(staged)))
            finally:
                shutil.rmtree(staged.parent, ignore_errors=True)
        else:
            tune.report(flat)

    return report


def _restore_from_tune(run_dir: Path, settings_now: dict) -> str | None:
    """Tune's checkpoint for this trial (its own, after an interruption, or a PBT donor's),
    unpacked into `run_dir/restored`; the trial takes over its label store. Each restore is
    one line of `restores.jsonl`. Returns the folder to resume from, or None."""
    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return None
    local = run_dir / "restored"
    if local.exists():
        shutil.rmtree(local)
    ckpt.to_directory(str(local))
    prefs = run_dir / "preferences"
    if (local / "preferences").exists():  # become the donor: its labels, its position
        if prefs.exists():
            shutil.rmtree(prefs)
        shutil.copytree(local / "preferences", prefs)
    donor = json.loads((local / "controller.json").read_text())
    metrics = run_dir / "metrics.jsonl"
    record = {"time": time.time(), "from_iteration": donor["iteration"],
              "from_run_id": donor.get("run_id"),
              "settings_before": {k: donor.get(f"{k}_settings") for k in settings_now},
              "settings_now": settings_now,
              # rows from here on in metrics.jsonl are this incarnation's
              "metrics_row": len(metrics.read_text().splitlines()) if metrics.exists() else 0}
    with open(run_dir / "restores.jsonl", "a") as f:  # each exploit / restore, in order
        f.write(json.dumps(record) + "\n")
    return str(local)
