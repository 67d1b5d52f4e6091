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

import json
import time
from pathlib import Path

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
from ray.tune.search import BasicVariantGenerator

from rlhf_ray import workloads
from rlhf_ray.errors import ConfigError
from rlhf_ray.runtime.cluster import init_ray
from rlhf_ray.runtime.names import APP_PREFIXES
from rlhf_ray.runtime.placement import placement_plan
from rlhf_ray.runtime.serving import delete_app, ensure_serve_http, serve_apps
from rlhf_ray.storage import locations
from rlhf_ray.sweep.spec import SweepConfig, first, load_sweep, trial_config
from rlhf_ray.sweep.summary import summarize
from rlhf_ray.sweep.trial import run_trial
from rlhf_ray.train import train

SPEC_FILE = "rlhf_sweep.json"


def _domain(dom: dict):
    kind, vals = next(iter(dom.items()))
    return {"grid": tune.grid_search, "choice": tune.choice}[kind](vals) if kind in (
        "grid", "choice") else {"uniform": tune.uniform, "loguniform": tune.loguniform}[kind](*vals)


def _metric(sweep: SweepConfig, cfg) -> str:
    return sweep.metric or workloads.of(cfg).default_metric


def _shared_stages(sweep: SweepConfig, root: str, progress: bool) -> dict[str, str]:
    """The stages every trial shares, run once (the LLM's SFT and first reward model, so
    every trial starts from the same pair), under the sweep folder (local or a URI); the
    trials' overrides that point at them."""
    cfg = trial_config(sweep, {k: first(v) for k, v in sweep.space.items()})
    shared = workloads.of(cfg).shared_stages(cfg) if sweep.shared_stages else None
    if shared is None:
        return {}
    out = locations.join(root, "shared")
    if not locations.is_file(locations.join(out, *shared.done.split("/"))):
        if progress:
            print("shared stages: SFT and the first reward model, once for all trials", flush=True)
        train(cfg, run_dir=out, stages=shared.stages, progress=False)
    return {key: locations.join(out, sub) for key, sub in shared.overrides.items()}


def run_sweep(path: str | None, overrides: list[str] | None = None, resume: str | None = None,
              progress: bool = True) -> Path:
    if resume:
        root = locations.normalize(resume)
        if locations.is_remote(root):
            locations.check(root, "--resume")
        spec_path = locations.join(root, SPEC_FILE)
        if not locations.is_file(spec_path):
            raise ConfigError(f"--resume {resume}: not a sweep folder (no {SPEC_FILE})")
        spec = json.loads(locations.read_text(spec_path))
        sweep = SweepConfig.model_validate(spec["sweep"])
    else:
        sweep = load_sweep(path, overrides)
        base = locations.normalize(sweep.storage_path)
        if locations.is_remote(base):  # a bucket that is missing or refused: stop here
            locations.check(base, "sweep.storage_path")
        root = locations.join(base, f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        spec = {"sweep": sweep.model_dump(mode="json")}
    if not locations.is_remote(root):
        root = str(Path(root).resolve())
        Path(root).mkdir(parents=True, exist_ok=True)
    cfg0 = trial_config(sweep, {k: first(v) for k, v in sweep.space.items()})
    metric = _metric(sweep, cfg0)
    started = init_ray(cfg0)
    try:
        # Serve's controller and proxy start here, outside any trial's placement group (a
        # trial starting them would have them captured in its group, where they cannot fit)
        ensure_serve_http(cfg0.labeler.host, cfg0.labeler.port)
        if "shared" not in spec:
            spec["shared"] = _shared_stages(sweep, root, progress)
            spec["shared_root"] = locations.join(root, "shared") if spec["shared"] else None
        locations.write_text(locations.join(root, SPEC_FILE), json.dumps(spec, indent=1))
        # Tune keeps trials, their checkpoints and (synced) run folders under root/tune
        fs, tune_root = locations.filesystem(root)
        remote = locations.is_remote(root)
        fs_kw = {"storage_filesystem": fs} if remote else {}
        cfg0 = trial_config(sweep, {**{k: first(v) for k, v in sweep.space.items()},
                                    **spec["shared"]})
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, spec=spec),
            tune.PlacementGroupFactory(placement_plan(workloads.of(cfg0).placement(cfg0)).bundles,
                                     strategy="PACK"))
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
    points = [{k: p.get(k, first(v)) for k, v in sweep.space.items()}
              for p in sweep.initial_points]
    # concurrency is the generator's own limit (Tune's max_concurrent_trials would wrap it)
    return BasicVariantGenerator(points_to_evaluate=points or None, random_state=sweep.seed,
                                 max_concurrent=sweep.max_concurrent_trials)


def _scheduler(sweep: SweepConfig, cfg):
    s = sweep.scheduler
    max_t = workloads.of(cfg).max_iterations(cfg)
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


