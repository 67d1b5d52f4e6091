"""The one entry point: `train(cfg)` runs the loop of the workload the config names, from the
CLI, a `ray job submit` entrypoint or a script. Everything that can be refused is checked
before anything starts (the run folder, and with `resume` its checkpoint)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from rlhf_ray import workloads
from rlhf_ray.errors import ConfigError
from rlhf_ray.runtime import console
from rlhf_ray.runtime.run_dir import RunDir
from rlhf_ray.storage import locations
from rlhf_ray.storage.store import PreferenceStore


def controller_class(cfg) -> type:
    """The controller of the config's workload."""
    return workloads.of(cfg).controller()


def prepare(cfg, run_dir: str | Path | None = None, *, resume: bool = False,
            stages: str = "all", **kwargs):
    """(controller, checkpoint to resume from or None), nothing started yet. A bad resume --
    no checkpoint, another format or workload, a complete run -- is a ConfigError."""
    workload = workloads.of(cfg)
    if stages != "all" and stages not in workload.stages:
        owners = [w.name for w in workloads.WORKLOADS.values() if stages in w.stages]
        raise ConfigError(f"`{stages}` is a stage of the {' or '.join(owners) or 'no'} workload; "
                          f"this config is the {workload.name} workload (run it whole: "
                          "`rlhf-ray train`)")
    cls = workload.controller()
    folder = RunDir(cfg, run_dir)
    folder.check()  # a bucket that is missing, credentials, an endpoint: before any role
    ckpt = None
    if resume:
        ckpt = folder.resume_point(cls.budget(cfg))[0]
        folder.pull()  # a remote run's metrics and events, to go on appending
    ctl = cls(cfg, folder, **kwargs)
    ctl.young_resume = resume and ckpt is None
    return ctl, ckpt


def train(cfg, run_dir: str | Path | None = None, *, stages: str = "all",
          on_metrics: Callable[[dict], None] | None = None, progress: bool = True,
          stop_event=None, resume: bool = False, log_output: bool = False) -> Path | str:
    """Run the whole loop (or a workload's stage alone, e.g. the LLM's `sft` | `rm` | `ppo`);
    returns the run folder (its URI for a remote one).
    `resume`: continue `run_dir` from its latest checkpoint. Setting `stop_event` (a
    threading.Event) ends the run after the current iteration, with a checkpoint.
    `log_output`: Ray's, RLlib's and Serve's own output goes to the run folder's driver.log
    instead of the terminal (the CLI's default)."""
    ctl, ckpt = prepare(cfg, run_dir, resume=resume, stages=stages, on_metrics=on_metrics,
                        progress=progress, stop_event=stop_event)
    try:
        with console.quiet(ctl.folder.log_path, enabled=log_output):
            if progress:
                console.note(f"run folder: {ctl.folder}" + (f" (resuming from {ckpt})" if ckpt else ""))
            if ctl.young_resume:  # said even when quiet: the run starts over, but not its labels
                console.note(f"resuming {ctl.folder}: it has no checkpoint yet; the learners start "
                             f"afresh on the {_stored_labels(ctl)} labels in its store")
            ctl.run(resume_from=ckpt, **({"stages": stages} if stages != "all" else {}))
    finally:  # a remote run's driver log, with a traceback if it failed
        ctl.folder.sync()
    ctl.folder.close()  # a remote run: pushed, the working copy removed
    return ctl.folder.uri if ctl.folder.remote else ctl.run_dir


def _stored_labels(ctl) -> int:
    """Queries answered in the run's store (a ranking of K counts once)."""
    if not locations.is_dir(ctl.folder.store_root):
        return 0
    labels = PreferenceStore(ctl.folder.store_root).labels()
    if "ranking_id" not in labels.column_names:
        return len(labels)
    return len({r or q for r, q in zip(labels.column("ranking_id").to_pylist(),
                                       labels.column("query_id").to_pylist())})
