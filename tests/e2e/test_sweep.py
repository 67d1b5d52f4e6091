"""`rlhf-ray sweep`: Ray Tune over the real loop on the session's 2-CPU cluster; an
interrupted sweep resumes; the best trial's exported config trains unchanged."""

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

from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.sweep import load_sweep

TINY = ["data.num_sft_examples=256", "data.num_prompts=128", "sft.epochs=1",
        "labels.initial=16", "labels.per_iteration=1", "reward_model.initial_epochs=2",
        "ppo.rollout_batch_size=16", "ppo.ppo_epochs=2", "run.iterations=3"]


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


def test_interrupted_sweep_resumes_and_exports_a_config_that_trains(ray_cluster, tmp_path):
    """A tiny sweep (2 trials of the smoke preset, beta 0.05 and 0.3, one after the other):
    interrupt `rlhf-ray sweep` (SIGINT, as Ctrl-C) once the first trial has finished and the
    second has started; `rlhf-ray sweep --resume DIR` runs the unfinished trial and leaves the
    finished one as it was; each reports its own beta and the metric; the exported best config
    is the config its trial trained with, and `rlhf-ray train` accepts it unchanged."""
    path = sweep_file(tmp_path, overrides=TINY)  # 2 trials x 3 iterations, one after the other
    # the sweep process joins the session's cluster, as `ray job submit` entrypoints do
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    cmd = [sys.executable, "-m", "rlhf_ray.cli", "sweep", str(path), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    root = None
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        # Tune starts the second trial only once the first has finished (concurrency 1)
        second = list((tmp_path / "sweeps").glob("tiny-*/tune/run_trial_*_00001_*"))
        if second:
            root = second[0].parents[1]
            break
        time.sleep(0.5)
    assert root is not None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    first = next((root / "tune").glob("run_trial_*_00000_*"))
    rows_before = (first / "run" / "metrics.jsonl").read_text()
    out = subprocess.run([sys.executable, "-m", "rlhf_ray.cli", "sweep", "--resume", str(root),
                          "--quiet"], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # the finished trial was not run again; the interrupted one finished
    assert (first / "run" / "metrics.jsonl").read_text() == rows_before
    assert len(rows_before.splitlines()) == 3
    rows = list(csv.DictReader(open(root / "sweep_summary.csv")))
    assert sorted(float(r["ppo.kl.init_coef"]) for r in rows) == [0.05, 0.3]
    for r in rows:
        assert int(r["iterations"]) == 3 and r["oracle_score_mean"] not in ("", "None")
    betas = set()
    for d in (root / "tune").iterdir():
        m = d / "run" / "metrics.jsonl"
        if m.exists():  # the first iteration's kl_coef is the trial's own value
            betas.add(json.loads(m.read_text().splitlines()[0])["kl_coef"])
    assert betas == {0.05, 0.3}
    assert (root / "score_vs_kl.png").stat().st_size > 1000
    assert (root / "shared" / "reward_model" / "model.safetensors").exists()  # trials shared it
    # the best config is the one its trial trained with (3 iterations, final model saved),
    # loaded as `rlhf-ray train` loads it (load_config), unchanged
    best_row = max(rows, key=lambda r: float(r["oracle_score_mean"]))
    trial_run = root / "tune" / best_row["trial"] / "run"
    assert (trial_run / "final" / "policy" / "model.safetensors").exists()
    best = load_config(str(root / "best_config.yaml"))
    trained = load_config(str(trial_run / "config.yaml"))
    # the trial ran with Tune's checkpointing instead of the config's own
    trained.run.checkpoint_every = best.run.checkpoint_every
    assert best == trained and best.ppo.kl.init_coef == float(best_row["ppo.kl.init_coef"])
