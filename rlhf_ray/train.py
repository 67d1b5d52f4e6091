"""The one entry point: `train(cfg)` runs either workload's loop, from the CLI, a `ray job
submit` entrypoint or a script. Everything that can be refused is checked before anything
starts (the run folder, and with `resume` its checkpoint)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from rlhf_ray import console
from rlhf_ray.config import ConfigError
from rlhf_ray.run_dir import RunDir


def controller_class(cfg):
    if cfg.workload == "llm":
        from rlhf_ray.llm.loop import LLMController

        return LLMController
    from rlhf_ray.control.loop import Controller

    return Controller


def prepare(cfg, run_dir: str | Path | None = None, *, resume: bool = False,
            stages: str = "all", **kwargs):
    """(controller, checkpoint to resume from or None), nothing started yet. A bad resume --
    no checkpoint, another format or workload, a complete run -- is a ConfigError."""
    if stages != "all" and cfg.workload != "llm":
        raise ConfigError(f"stages={stages!r}: the stages sft, rm and ppo are the language-model "
                          "workload's; this config is the control workload")
    cls = controller_class(cfg)
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
    """Run the whole loop (LLM: `stages` sft | rm | ppo alone); returns the run folder (its
    URI for a remote one).
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
    from rlhf_ray import storage
    from rlhf_ray.store import PreferenceStore

    if not storage.is_dir(ctl.folder.store_root):
        return 0
    labels = PreferenceStore(ctl.folder.store_root).labels()
    if ctl.cfg.workload == "llm" and "ranking_id" in labels.column_names:
        return len(set(labels.column("ranking_id").to_pylist()))
    return len(labels)
