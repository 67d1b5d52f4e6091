"""`rlhf-ray sweep`: Ray Tune over the whole RLHF loop of either workload.

A sweep file names a base preset (or YAML), overrides for every trial, a search space of
dotted config keys, a scheduler (FIFO, ASHA, PBT), the metric and mode, trials and
concurrency. Each trial is the real loop -- rollout or generation workers, reward model,
labeler, learner -- inside the trial's placement group (its bundles come from the run
config's placement), reporting every iteration's metrics to Tune.

PBT exploit hands a trial its donor's whole state: the checkpoint holds policy, critic and
their optimizer moments, the reward model, the KL controller, the prompt position and a copy
of the preference store, so the clone continues from where its donor was (with the mutated
beta / KL target). `--resume` continues an interrupted sweep with `Tuner.restore`.

At the end: a results table, `sweep_summary.csv`, `score_vs_kl.png` (score against KL per
trial) and `best_config.yaml`, which `rlhf-ray train` accepts unchanged.
"""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rlhf_ray.config import (ConfigError, _read_source, apply_overrides, dump_config,
                             validate)
from rlhf_ray import storage
from rlhf_ray.roles import APP_PREFIXES, delete_app, init_ray, placement_plan, serve_apps

SPEC_FILE = "rlhf_sweep.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SchedulerConfig(_Strict):
    kind: Literal["fifo", "asha", "pbt"] = "fifo"
    grace_period: int = Field(3, ge=1, description="asha: iterations before a trial can stop")
    reduction_factor: float = Field(2.0, gt=1, description="asha")
    perturbation_interval: int = Field(5, ge=1, description="pbt: iterations between exploits")
    quantile_fraction: float = Field(0.25, gt=0, le=0.5, description="pbt")
    resample_probability: float = Field(0.25, ge=0, le=1, description="pbt")
    synch: bool = Field(False, description="pbt: Tune's synchronous PBT; every trial waits at "
                        "each perturbation step until all have reached it, so trials that run "
                        "at different speeds are still ranked against each other")


class SweepConfig(_Strict):
    name: str = "sweep"
    description: str = ""
    base: str = Field(description="preset name or YAML path every trial starts from")
    overrides: list[str] = Field(default_factory=list, description="key=value for every trial")
    space: dict[str, dict[str, Any]] = Field(
        description="dotted key -> {grid: [..]} | {choice: [..]} | {uniform: [lo, hi]} | "
        "{loguniform: [lo, hi]}")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    metric: str | None = Field(None, description="default: oracle_score_mean (llm), "
                               "true_return_mean (control)")
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(1, ge=1, description="samples of the space (each grid point x this)")
    initial_points: list[dict[str, Any]] = Field(
        default_factory=list, description="trials to run first, each a {dotted key: value} "
        "point of the space (Tune's points_to_evaluate); the rest are sampled")
    seed: int | None = Field(None, description="seed of the search's sampling (reproducible "
                             "trial values)")
    max_concurrent_trials: int = Field(1, ge=1)
    storage_path: str = Field("sweeps", description="local folder or s3:// / gs:// URI")
    shared_stages: bool = Field(
        True, description="llm: run SFT and the first reward model once, shared by all trials")

    @model_validator(mode="after")
    def _check(self) -> "SweepConfig":
        kinds = {"grid", "choice", "uniform", "loguniform"}
        for key, dom in self.space.items():
            if len(dom) != 1 or next(iter(dom)) not in kinds:
                raise ValueError(f"space.{key}={dom!r}: use one of {{grid|choice: [..]}}, "
                                 "{uniform|loguniform: [lo, hi]}")
            kind, vals = next(iter(dom.items()))
            if not isinstance(vals, list) or not vals:
                raise ValueError(f"space.{key}.{kind}: needs a non-empty list")
            if kind in ("uniform", "loguniform") and (len(vals) != 2 or not vals[0] < vals[1]
                                                      or (kind == "loguniform" and vals[0] <= 0)):
                raise ValueError(f"space.{key}.{kind}={vals}: needs [low, high] with "
                                 f"{'0 < ' if kind == 'loguniform' else ''}low < high")
        for i, point in enumerate(self.initial_points):
            unknown = sorted(set(point) - set(self.space))
            if unknown:
                raise ValueError(f"initial_points[{i}]: {', '.join(unknown)} not in space "
                                 f"(space keys: {', '.join(self.space)})")
        if self.initial_points and any("grid" in d for d in self.space.values()):
            raise ValueError("initial_points: not with grid domains (a grid runs every point)")
        if self.scheduler.kind == "pbt" and any("grid" in d for d in self.space.values()):
            raise ValueError("scheduler.kind=pbt: PBT mutates sampled values; use choice, "
                             "uniform or loguniform, not grid")
        return self


def load_sweep(path: str, overrides: list[str] | None = None) -> SweepConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file {path!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    trial_overrides = []
    for item in overrides or []:  # sweep.* keys change the sweep; others go to every trial
        if item.startswith("sweep."):
            data = apply_overrides(data, [item[len("sweep."):]])
        else:
            trial_overrides.append(item)
    data["overrides"] = list(data.get("overrides") or []) + trial_overrides
    try:
        cfg = SweepConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"{path}: {loc}: unknown key") from None
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{path}: {msg}" if err["type"] == "value_error"
                          else f"{path}: {loc}={err.get('input')!r}: {msg}") from None
    base = Path(path).parent / cfg.base
    if cfg.base.endswith((".yaml", ".yml")) and base.is_file():
        cfg.base = str(base)
    # every trial's config must validate: check the base, one point of the space and the
    # initial points now
    trial_config(cfg, {k: _first(v) for k, v in cfg.space.items()})
    for point in cfg.initial_points:
        trial_config(cfg, {**{k: _first(v) for k, v in cfg.space.items()}, **point})
    return cfg


def _first(dom: dict) -> Any:
    kind, vals = next(iter(dom.items()))
    return vals[0]


def trial_config(sweep: SweepConfig, params: dict[str, Any]):
    data = apply_overrides(_read_source(sweep.base), list(sweep.overrides))
    data = apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in params.items()])
    return validate(data)


def _domain(dom: dict):
    from ray import tune

    kind, vals = next(iter(dom.items()))
    return {"grid": tune.grid_search, "choice": tune.choice}[kind](vals) if kind in (
        "grid", "choice") else {"uniform": tune.uniform, "loguniform": tune.loguniform}[kind](*vals)


def _metric(sweep: SweepConfig, cfg) -> str:
    return sweep.metric or ("oracle_score_mean" if cfg.workload == "llm" else "true_return_mean")


# ------------------------------------------------------------------------ the trial


def _cleanup_serve(trial_id: str) -> None:
    for name in serve_apps():
        if name.endswith(trial_id) and name.startswith(APP_PREFIXES):
            delete_app(name)


def run_trial(config: dict, spec: dict) -> None:
    """The Tune trainable: the real loop, one trial."""
    from ray import tune

    sweep = SweepConfig.model_validate(spec["sweep"])
    params = {k: config[k] for k in sweep.space}
    cfg = trial_config(sweep, {**params, **spec.get("shared", {})})
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    run_dir = Path(ctx.get_trial_dir()) / "run"
    _cleanup_serve(trial_id)  # an earlier incarnation of this trial (PBT exploit, restore)
    pbt_every = sweep.scheduler.perturbation_interval if sweep.scheduler.kind == "pbt" else 0
    if cfg.workload == "llm":
        _run_llm_trial(cfg, run_dir, trial_id, pbt_every, tune, spec.get("shared_root"))
    else:
        _run_control_trial(cfg, run_dir, trial_id, pbt_every, tune)


def _trial_checkpoint_every(pbt_every: int, cfg) -> int:
    """How often a trial checkpoints through Tune: the config's `run.checkpoint_every`, or
    PBT's perturbation interval where that is sooner (an exploit takes the donor's newest
    checkpoint; checkpointing every iteration makes one always exist, whichever trial is
    faster)."""
    own = cfg.run.checkpoint_every
    return min(pbt_every, own) if pbt_every and own else (pbt_every or own)


def _report_with_checkpoint(ctl, run_dir: Path, every: int, tune):
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


def _restore_from_tune(run_dir: Path, tune, settings_now: dict) -> str | None:
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


def _run_llm_trial(cfg, run_dir: Path, trial_id: str, every: int, tune,
                   spec_shared_root: str | None = None) -> None:
    from rlhf_ray.llm.loop import LLMController

    cfg = cfg.model_copy(deep=True)
    every = _trial_checkpoint_every(every, cfg)
    cfg.run.checkpoint_every = 0  # checkpoints here are Tune's
    ctl = LLMController(cfg, str(run_dir), progress=False, run_id=trial_id,
                        plan=placement_plan(cfg))
    # the checkpoint may be another trial's (a PBT donor, still running): its applications
    # stay up, and this trial's rows stay (restores.jsonl says where each incarnation begins)
    ctl.resume_own = False
    ctl.on_metrics = _report_with_checkpoint(ctl, run_dir, every, tune)
    shared_prefs = storage.join(spec_shared_root, "preferences") if spec_shared_root else None
    if shared_prefs is not None and storage.is_dir(shared_prefs) and \
            not (run_dir / "preferences").exists():
        # trials start from the shared reward model and the labels it was fitted on
        storage.download_dir(shared_prefs, run_dir / "preferences")
    resume_from = _restore_from_tune(run_dir, tune,
                                     {"kl": cfg.ppo.kl.model_dump(mode="json")})
    # a PBT exploit hands over the donor's checkpoint with mutated KL settings: the resumed
    # controller takes the new settings (it compares them with the checkpoint's)
    ctl.run("all", resume_from=resume_from)


def _run_control_trial(cfg, run_dir: Path, trial_id: str, every: int, tune) -> None:
    """The control loop as a trial: checkpoints through Tune (RLlib's state, the reward
    ensemble with its normalizers, the schedule's position, the query pool, the label
    store; `_trial_checkpoint_every`), so PBT exploits copy the whole state and an
    interrupted sweep resumes each trial where it stopped."""
    from rlhf_ray.control.loop import Controller

    cfg = cfg.model_copy(deep=True)
    every = _trial_checkpoint_every(every, cfg)
    cfg.run.checkpoint_every = 0  # checkpoints here are Tune's
    ctl = Controller(cfg, str(run_dir), progress=False, run_id=trial_id, plan=placement_plan(cfg))
    ctl.resume_own = False  # as for the LLM trial: the checkpoint may be a donor's
    ctl.on_metrics = _report_with_checkpoint(ctl, run_dir, every, tune)
    resume_from = _restore_from_tune(run_dir, tune, {"ppo": cfg.ppo.model_dump(mode="json")})
    ctl.run(resume_from=resume_from)


# ------------------------------------------------------------------------ the sweep


def _shared_stages(sweep: SweepConfig, root: str, progress: bool) -> dict[str, str]:
    """llm: SFT and the first reward model once, so every trial starts from the same pair
    (under the sweep folder, local or a URI)."""
    from rlhf_ray.train import train

    cfg = trial_config(sweep, {k: _first(v) for k, v in sweep.space.items()})
    if cfg.workload != "llm" or not sweep.shared_stages:
        return {}
    if cfg.model.sft_path and cfg.model.reward_path:
        return {}
    out = storage.join(root, "shared")
    if not storage.is_file(storage.join(out, "reward_model", "model.safetensors")):
        if progress:
            print("shared stages: SFT and the first reward model, once for all trials", flush=True)
        train(cfg, run_dir=out, stages="rm", progress=False)
    return {"model.sft_path": storage.join(out, "sft"),
            "model.reward_path": storage.join(out, "reward_model")}


def run_sweep(path: str | None, overrides: list[str] | None = None, resume: str | None = None,
              progress: bool = True) -> Path:
    import ray
    from ray import tune

    if resume:
        root = storage.normalize(resume)
        if storage.is_remote(root):
            storage.check(root, "--resume")
        spec_path = storage.join(root, SPEC_FILE)
        if not storage.is_file(spec_path):
            raise ConfigError(f"--resume {resume}: not a sweep folder (no {SPEC_FILE})")
        spec = json.loads(storage.read_text(spec_path))
        sweep = SweepConfig.model_validate(spec["sweep"])
    else:
        sweep = load_sweep(path, overrides)
        base = storage.normalize(sweep.storage_path)
        if storage.is_remote(base):  # a bucket that is missing or refused: stop here
            storage.check(base, "sweep.storage_path")
        root = storage.join(base, f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        spec = {"sweep": sweep.model_dump(mode="json")}
    if not storage.is_remote(root):
        root = str(Path(root).resolve())
        Path(root).mkdir(parents=True, exist_ok=True)
    cfg0 = trial_config(sweep, {k: _first(v) for k, v in sweep.space.items()})
    metric = _metric(sweep, cfg0)
    started = init_ray(cfg0)
    try:
        # Serve's controller and proxy start here, outside any trial's placement group (a
        # trial starting them would have them captured in its group, where they cannot fit)
        from rlhf_ray.roles import ensure_serve_http

        ensure_serve_http(cfg0.labeler.host, cfg0.labeler.port)
        if "shared" not in spec:
            spec["shared"] = _shared_stages(sweep, root, progress)
            spec["shared_root"] = storage.join(root, "shared") if spec["shared"] else None
        storage.write_text(storage.join(root, SPEC_FILE), json.dumps(spec, indent=1))
        # Tune keeps trials, their checkpoints and (synced) run folders under root/tune
        fs, tune_root = storage.filesystem(root)
        remote = storage.is_remote(root)
        fs_kw = {"storage_filesystem": fs} if remote else {}
        cfg0 = trial_config(sweep, {**{k: _first(v) for k, v in sweep.space.items()},
                                    **spec["shared"]})
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, spec=spec),
            tune.PlacementGroupFactory(placement_plan(cfg0).bundles, strategy="PACK"))
        if resume:
            tuner = tune.Tuner.restore(f"{tune_root}/tune", trainable=trainable,
                                       resume_unfinished=True, resume_errored=True, **fs_kw)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={k: _domain(v) for k, v in sweep.space.items()},
                tune_config=tune.TuneConfig(
                    metric=metric, mode=sweep.mode, num_samples=sweep.num_samples,
                    scheduler=_scheduler(sweep, cfg0), reuse_actors=False,
                    search_alg=_search(sweep)),
                run_config=tune.RunConfig(
                    name="tune", storage_path=tune_root, verbose=1 if progress else 0,
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
                    failure_config=tune.FailureConfig(max_failures=0),
                    # on a URI, each trial's run folder (metrics, TensorBoard) goes there too
                    sync_config=tune.SyncConfig(sync_artifacts=remote), **fs_kw))
        apps_before = serve_apps()
        try:
            grid = tuner.fit()
        finally:  # trials Tune stopped (ASHA, PBT) could not delete their Serve apps
            for name in serve_apps() - apps_before:
                if name.startswith(APP_PREFIXES):
                    delete_app(name)
        summarize(grid, sweep, spec, root, metric, progress)
        return root
    finally:
        if started:
            ray.shutdown()


def _search(sweep: SweepConfig):
    from ray.tune.search import BasicVariantGenerator

    points = [{k: p.get(k, _first(v)) for k, v in sweep.space.items()}
              for p in sweep.initial_points]
    # concurrency is the generator's own limit (Tune's max_concurrent_trials would wrap it)
    return BasicVariantGenerator(points_to_evaluate=points or None, random_state=sweep.seed,
                                 max_concurrent=sweep.max_concurrent_trials)


def _scheduler(sweep: SweepConfig, cfg):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s = sweep.scheduler
    max_t = cfg.run.iterations if cfg.workload == "llm" else 10_000
    if s.kind == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=max_t,
                             grace_period=s.grace_period, reduction_factor=s.reduction_factor)
    if s.kind == "pbt":
        return PopulationBasedTraining(
            time_attr="training_iteration", perturbation_interval=s.perturbation_interval,
            quantile_fraction=s.quantile_fraction, resample_probability=s.resample_probability,
            hyperparam_mutations={k: _domain(v) for k, v in sweep.space.items()},
            synch=s.synch)
    return FIFOScheduler()


def summarize(grid, sweep: SweepConfig, spec: dict, root: str | Path, metric: str,
              progress: bool = True) -> dict:
    """Console table, sweep_summary.csv, score_vs_kl.png and best_config.yaml (in the sweep
    folder, local or a URI)."""
    with storage.writable_dir(str(root)) as out:
        return _summarize(grid, sweep, spec, Path(out), metric, progress, str(root))


def _summarize(grid, sweep: SweepConfig, spec: dict, out: Path, metric: str, progress: bool,
               root: str) -> dict:
    keys = list(sweep.space)
    kl_key = "kl_mean"
    rows = []
    for res in grid:
        if res.metrics is None:
            continue
        hist = res.metrics_dataframe
        m = res.metrics
        rows.append({"trial": res.path.rsplit("/", 1)[-1] if res.path else "?",
                     **{k: res.config.get(k) for k in keys},
                     metric: m.get(metric), f"best_{metric}": (
                         float(hist[metric].max() if sweep.mode == "max" else hist[metric].min())
                         if hist is not None and metric in hist else None),
                     kl_key: m.get(kl_key), "iterations": m.get("training_iteration"),
                     "error": bool(res.error)})
    ok = [r for r in rows if r[metric] is not None and not r["error"]]
    if not ok:
        raise RuntimeError(f"sweep {root}: no trial reported {metric}")
    best = (max if sweep.mode == "max" else min)(ok, key=lambda r: r[metric])
    with open(out / "sweep_summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    best_params = {k: best[k] for k in keys}
    cfg = trial_config(sweep, {**best_params, **spec.get("shared", {})})
    (out / "best_config.yaml").write_text(dump_config(cfg))
    _plot(grid, metric, kl_key, keys, out / "score_vs_kl.png")
    if progress:
        cols = ["trial", *keys, metric, kl_key, "iterations"]
        print("  ".join(f"{c:>22s}" for c in cols))
        for r in rows:
            print("  ".join(f"{_fmt(r[c]):>22s}" for c in cols))
        print(f"best: {best['trial']} {metric}={_fmt(best[metric])}  ->  "
              f"{storage.join(root, 'best_config.yaml')}")
    return {"rows": rows, "best": best}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _plot(grid, metric: str, kl_key: str, keys: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for res in grid:
        df = res.metrics_dataframe
        if df is None or metric not in df:
            continue
        label = ", ".join(f"{k.split('.')[-1]}={_fmt(res.config.get(k))}" for k in keys)
        x = df[kl_key] if kl_key in df else df["training_iteration"]
        ax.plot(x, df[metric], marker="o", ms=3, alpha=0.8, label=label)
    ax.set_xlabel(f"{kl_key} (KL of the policy from its reference)")
    ax.set_ylabel(metric)
    ax.set_title("score against KL, per trial (each point: one iteration)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
