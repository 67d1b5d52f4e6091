"""`rlhf-ray sweep`: Ray Tune over the real loop on the session's 2-CPU cluster: a PBT
exploit hands a trial its donor's whole state; an interrupted sweep resumes; the best
trial's exported config is the one it trained with."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rlhf_ray.config import load_config
from rlhf_ray.errors import ConfigError
from rlhf_ray.storage import locations
from rlhf_ray.storage.store import PreferenceStore
from rlhf_ray.sweep.driver import load_sweep

TINY = ["data.num_sft_examples=256", "data.num_prompts=128", "sft.epochs=1",
        "labels.initial=16", "labels.per_iteration=1", "reward_model.initial_epochs=2",
        "ppo.rollout_batch_size=16", "ppo.ppo_epochs=2", "run.iterations=3"]
SMALL = [  # two trials side by side on the session's 2 CPUs
    "placement.generation_worker.num_cpus=0.25", "placement.learner.num_cpus=0.25",
    "placement.reward_trainer.num_cpus=0.1", "placement.reward_model.num_cpus=0.1"]


def sweep_file(tmp_path: Path, **extra) -> Path:
    spec = {"name": "tiny", "base": "llm-tiny-smoke", "overrides": TINY,
            "space": {"ppo.kl.init_coef": {"grid": [0.05, 0.3]}},
            "scheduler": {"kind": "fifo"}, "storage_path": str(tmp_path / "sweeps"), **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_sweep_file_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="space.ppo.kl.init_coef"):
        load_sweep(str(sweep_file(tmp_path, space={"ppo.kl.init_coef": {"gird": [1]}})))
    with pytest.raises(ConfigError, match="ppo.kl.init_coef"):  # a value the run config refuses
        load_sweep(str(sweep_file(tmp_path, space={"ppo.kl.init_coef": {"grid": [-1.0]}})))
    with pytest.raises(ConfigError, match="pbt"):
        load_sweep(str(sweep_file(tmp_path, scheduler={"kind": "pbt"})))
    with pytest.raises(ConfigError, match=r"initial_points\[0\]: ppo.kl.target not in space"):
        load_sweep(str(sweep_file(tmp_path, space={"ppo.kl.init_coef": {"choice": [0.1, 1]}},
                                  initial_points=[{"ppo.kl.target": 3}])))
    with pytest.raises(ConfigError, match="ppo.kl.init_coef"):  # a point the run config refuses
        load_sweep(str(sweep_file(tmp_path, space={"ppo.kl.init_coef": {"choice": [0.1, 1]}},
                                  initial_points=[{"ppo.kl.init_coef": -2}])))
    for f in Path("tune_configs").glob("*.yaml"):  # the packaged sweeps validate
        load_sweep(str(f))


def _exploits(root, section: str = "kl", key: str = "init_coef") -> list[tuple[Path, dict]]:
    """(trial run folder, record) for each restore whose setting (beta; control: PPO's
    kl_coeff) differs from its checkpoint's: a PBT exploit (Tune restoring a trial's own
    checkpoint keeps it). `root`: the sweep folder, local or a URI."""
    out = []
    root = str(root)
    for trial in locations.listdir(locations.join(root, "tune")):
        f = locations.join(root, "tune", trial, "run", "restores.jsonl")
        if not locations.is_file(f):
            continue
        for r in map(json.loads, locations.read_text(f).splitlines()):
            if r["settings_now"][section][key] != r["settings_before"][section][key]:
                out.append((Path(locations.join(root, "tune", trial, "run")), r))
    return out


def _interrupt_after_an_exploit_and_resume(path: Path, base: str, ray_cluster, section: str,
                                           key: str, name: str) -> str:
    """`rlhf-ray sweep` interrupted (SIGINT, as Ctrl-C) right after its first PBT exploit,
    then `rlhf-ray sweep --resume DIR` to the end; returns the sweep folder (under `base`,
    the sweep's storage_path: local or a URI)."""
    # the sweep process joins the session's cluster, as `ray job submit` entrypoints do
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    cmd = [sys.executable, "-m", "rlhf_ray.cli", "sweep", str(path), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    root = None
    deadline = time.time() + 500
    while time.time() < deadline and proc.poll() is None:
        found = [n for n in locations.listdir(base) if n.startswith(f"{name}-")]
        if found and _exploits(locations.join(base, found[0]), section, key):
            root = locations.join(base, found[0])
            break
        time.sleep(0.5)
    assert root is not None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    out = subprocess.run([sys.executable, "-m", "rlhf_ray.cli", "sweep", "--resume", root,
                          "--quiet"], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return root


def _pbt_over_kl(tmp_path: Path, ray_cluster, name: str, key: str, section: str,
                 storage_path: str | None = None, interrupt: bool = True, synch: bool = False,
                 **spec) -> Path:
    """A two-trial PBT sweep over a KL setting (`key`, its checkpoint section `section`):
    trials at 0.01 and 2.0, ranked by the KL coefficient itself (kl_coef, max) so the 0.01
    trial is the one that clones, perturbation every 2 iterations; with `interrupt`,
    interrupted after its first exploit and resumed (`_interrupt_after_an_exploit_and_resume`).
    With a URI `storage_path` the sweep folder lives there; it is then downloaded and its
    local copy returned, for the same checks."""
    base = storage_path or str(tmp_path / "sweeps")
    path = sweep_file(
        tmp_path, name=name, space={key: {"loguniform": [0.001, 10.0]}},
        initial_points=[{key: 0.01}, {key: 2.0}],
        num_samples=2, max_concurrent_trials=2, seed=0, metric="kl_coef", mode="max",
        scheduler={"kind": "pbt", "perturbation_interval": 2, "quantile_fraction": 0.5,
                   "resample_probability": 0.0, "synch": synch}, storage_path=base, **spec)
    if interrupt:
        root = _interrupt_after_an_exploit_and_resume(path, base, ray_cluster, section,
                                                      key.rsplit(".", 1)[-1], name)
    else:  # the sweep process joins the session's cluster, as `ray job submit` entrypoints do
        env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
        out = subprocess.run([sys.executable, "-m", "rlhf_ray.cli", "sweep", str(path),
                              "--quiet"], env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        [root] = [locations.join(base, n) for n in locations.listdir(base) if n.startswith(f"{name}-")]
    if not locations.is_remote(root):
        return Path(root)
    assert not list(tmp_path.glob("sweeps")), "a URI sweep wrote a local sweep folder"
    local = tmp_path / "downloaded" / locations.name(root)
    locations.download_dir(root, local)
    return local


def test_llm_pbt_exploit_copies_the_whole_state_and_exports_a_config(ray_cluster, tmp_path):
    """A tiny PBT sweep over beta: 2 trials of the smoke preset side by side (0.01 and 2.0),
    5 iterations, perturbation every 2. Ranked by beta itself (kl_coef, max), so the 0.01
    trial is the one that clones, whatever the tiny runs' scores do. At a perturbation step
    the worse trial takes the better one's checkpoint -- policy, critic, reward model, KL
    controller, label store -- and continues from the donor's iteration with a mutated beta.
    Each reported its own beta and the metric; the exported best config is the one its trial
    trained with. (An interrupted sweep resuming from its folder, which is the same code for
    both workloads, is the control test's below.)"""
    # Synchronous PBT: the trials are ranked at a perturbation step only once both reached
    # it (asynchronously, a trial that ran ahead under load was ranked alone: no exploit,
    # seen once in a fresh-clone CI run). Trials checkpoint every iteration
    # (run.checkpoint_every=1), so at the 0.01 trial's perturbation step its donor always has
    # a checkpoint to hand over, whichever trial runs ahead (with checkpoints only at perturbation steps that was a coin flip when the tiny
    # trials run in lockstep, measured)
    root = _pbt_over_kl(tmp_path, ray_cluster, "pbt", "ppo.kl.init_coef", "kl",
                        overrides=TINY + SMALL + ["run.iterations=5", "run.checkpoint_every=1"],
                        interrupt=False, synch=True)
    # every trial finished and reported the metric; each started from its own beta
    rows = list(csv.DictReader(open(root / "sweep_summary.csv")))
    assert len(rows) == 2 and all(int(r["iterations"]) == 5 for r in rows)
    assert all(r["kl_coef"] not in ("", "None") for r in rows)
    first = {json.loads((d / "run" / "metrics.jsonl").read_text().splitlines()[0])["kl_coef"]
             for d in (root / "tune").iterdir() if (d / "run" / "metrics.jsonl").exists()}
    assert first == {0.01, 2.0}
    # the clone went on from the donor's iteration with the mutated beta ...
    exploits = _exploits(root)
    assert exploits
    for run, r in exploits:
        metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert r["from_iteration"] < 5  # perturbations at 2 and 4
        assert metrics[r["metrics_row"]]["iteration"] == r["from_iteration"] + 1, (r, metrics)
        assert metrics[r["metrics_row"]]["kl_coef"] == pytest.approx(
            r["settings_now"]["kl"]["init_coef"], rel=1e-4)  # the KL controller restarted from it
        # ... and the last donor's labels: every comparison in its store is in the clone's
        donor = set(PreferenceStore(str(run / "restored" / "preferences")).labels()
                    .column("query_id").to_pylist())
        own = set(PreferenceStore(str(run / "preferences")).labels().column("query_id").to_pylist())
        assert donor and donor <= own
    assert (root / "score_vs_kl.png").stat().st_size > 1000
    assert (root / "shared" / "reward_model" / "model.safetensors").exists()  # trials shared it
    # the best config is the one its trial trained with (final model saved), loaded as
    # `rlhf-ray train` loads it (load_config), unchanged
    best_row = max(rows, key=lambda r: float(r["kl_coef"]))
    trial_run = root / "tune" / best_row["trial"] / "run"
    assert (trial_run / "final" / "policy" / "model.safetensors").exists()
    best = load_config(str(root / "best_config.yaml"))
    trained = load_config(str(trial_run / "config.yaml"))
    # the trial ran with Tune's checkpointing instead of the config's own
    trained.run.checkpoint_every = best.run.checkpoint_every
    assert best == trained


CONTROL_TINY = [  # hopper-smoke, 5 iterations of 1,000 steps; two trials on the 2 CPUs
    "run.total_env_steps=5000", "ppo.train_batch_size=1000", "ppo.minibatch_size=250",
    "ppo.use_kl_loss=true", "labels.budget=24", "labels.pool_size=200",
    "reward_model.pretrain_steps=40", "reward_model.steps_per_round=10",
    "run.final_eval_episodes=0", "run.checkpoint_every=1", "placement.env_runner.num_cpus=0.25",
    "placement.learner.num_cpus=0.25", "placement.reward_trainer.num_cpus=0.1",
    "placement.reward_model.num_cpus=0.1"]


def test_control_pbt_exploit_copies_the_whole_state_and_an_interrupted_sweep_resumes(
        ray_cluster, s3, tmp_path):
    """The control workload under PBT: 2 trials of the Hopper smoke preset side by side,
    PPO's KL coefficient 0.01 and 2.0, ranked by it (kl_coef, max), perturbation every 2
    iterations. Trials checkpoint through Tune: the exploiting trial takes its donor's whole
    state -- RLlib's policy and optimizer, the reward ensemble with its normalizers, the label
    schedule's position, the query pool, the label store -- and continues from the donor's
    env steps with a mutated KL coefficient. Interrupted right after that, `rlhf-ray sweep
    --resume URI` finishes every trial from its checkpoint. The sweep folder -- Tune's trials
    and checkpoints, each trial's run folder, the summary -- is on a real S3-protocol server
    (sweep.storage_path=s3://...); the checks below read a downloaded copy of it."""
    root = _pbt_over_kl(tmp_path, ray_cluster, "cpbt", "ppo.kl_coeff", "ppo",
                        storage_path=f"{s3('sweeps')}/team", base="hopper-smoke",
                        overrides=CONTROL_TINY)
    rows = list(csv.DictReader(open(root / "sweep_summary.csv")))
    assert len(rows) == 2 and all(r["kl_coef"] not in ("", "None") for r in rows), rows
    for d in (root / "tune").iterdir():  # every trial ran to its env-step budget
        if d.is_dir():
            last = json.loads((d / "run" / "metrics.jsonl").read_text().splitlines()[-1])
            assert last["env_steps"] >= 5000, (d, last)
    exploits = _exploits(root, "ppo", "kl_coeff")
    assert exploits
    for run, r in exploits:
        metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        donor = json.loads((run / "restored" / "controller.json").read_text())
        first = metrics[r["metrics_row"]]  # the clone's first iteration after the exploit
        assert first["iteration"] == r["from_iteration"] + 1, (r, metrics)
        # it went on from the donor's env steps, reward model version and labels ...
        assert donor["env_steps"] < first["env_steps"] <= donor["env_steps"] + 2 * 1000
        assert first["rm_version"] >= donor["reward_trainer"]["version"]
        donor_ids = set(PreferenceStore(str(run / "restored" / "preferences")).labels()
                        .column("query_id").to_pylist())
        own = set(PreferenceStore(str(run / "preferences")).labels().column("query_id").to_pylist())
        assert donor_ids and donor_ids <= own
        assert first["labels_total"] >= len(donor_ids)
        # ... with PPO's KL coefficient restarted from the mutated setting (one update
        # multiplies it by 0.5, 1 or 1.5)
        ratio = first["kl_coef"] / r["settings_now"]["ppo"]["kl_coeff"]
        assert min(abs(ratio - f) for f in (0.5, 1.0, 1.5)) < 1e-3, (ratio, r)
    for d in (root / "tune").iterdir():  # every trial checkpointed through Tune
        if d.is_dir():
            assert list(d.glob("checkpoint_*/controller.json")), d
