"""Kill the controller (SIGKILL, mid-run) and `rlhf-ray train --resume RUN_DIR`: the run goes
on from its last checkpoint with its policy, KL coefficient, reward model and labels, and ends
with the same label budget; no acknowledged label is lost or stored twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from rlhf_ray.metrics import read_metrics
from rlhf_ray.store import PreferenceStore

# the KL penalty on, so PPO's adaptive KL coefficient is part of what must come back
OVERRIDES = ["run.checkpoint_every=2", "run.total_env_steps=12000", "labels.budget=60",
             "ppo.use_kl_loss=true"]


def test_killed_controller_resumes_from_its_checkpoint(ray_cluster, tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    cli = [sys.executable, "-m", "rlhf_ray.cli", "train"]
    proc = subprocess.Popen([*cli, "hopper-smoke", "--run-dir", str(run), "--quiet", *OVERRIDES],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # past the first checkpoint
        if (run / "checkpoints" / "iter_000002" / "controller.json").exists() and \
                len((run / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0].decode()[-3000:]
    proc.send_signal(signal.SIGKILL)  # the controller dies mid-run, between checkpoints
    proc.wait()
    store = PreferenceStore(str(run / "preferences"))
    acked = set(store.labels().column("query_id").to_pylist())
    ckpt = sorted((run / "checkpoints").glob("iter_*"))[-1]
    state = json.loads((ckpt / "controller.json").read_text())
    assert state["kl_coeffs"] and (ckpt / "pool").is_dir()

    out = subprocess.run([*cli, "--resume", str(run), "--quiet"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = read_metrics(run)
    n = state["iteration"]
    # one continuous run: the dead run's rows after its checkpoint were superseded
    assert [r["iteration"] for r in rows] == list(range(1, len(rows) + 1))
    assert (run / "metrics.superseded.jsonl").exists()
    assert rows[-1]["env_steps"] >= 12000
    first = rows[n]  # the first iteration after the resume
    assert state["env_steps"] < first["env_steps"] <= state["env_steps"] + 2 * 2000
    # PPO's KL coefficient went on from the checkpoint's (RLlib's checkpoint lacks it):
    # one update multiplies it by 0.5, 1 or 1.5
    ratio = first["kl_coeff"] / state["kl_coeffs"]["default_policy"]
    assert min(abs(ratio - f) for f in (0.5, 1.0, 1.5)) < 1e-3, ratio
    # the reward model went on from its version
    assert first["rm_version"] >= state["reward_trainer"]["version"]
    # the same label budget; every label acknowledged before the kill is there, none twice
    ids = store.labels().column("query_id").to_pylist()
    assert len(ids) == len(set(ids)) == 60 == rows[-1]["labels_total"]
    assert acked <= set(ids)
    # the dead controller's reward-model app was cleaned up
    from ray import serve

    assert f"rlhf-rm-{state['run_id']}" not in serve.status().applications


def test_resume_refuses_what_it_cannot_continue(tmp_path, capsys):
    from rlhf_ray.cli import main

    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    run = tmp_path / "run"
    (run / "checkpoints" / "iter_000002").mkdir(parents=True)
    from rlhf_ray.config import dump_config, load_config

    (run / "config.yaml").write_text(dump_config(load_config("hopper-smoke")))
    assert main(["train", "--resume", str(run)]) == 2
    assert "no checkpoint with a controller.json" in capsys.readouterr().err
    (run / "checkpoints" / "iter_000002" / "controller.json").write_text(
        json.dumps({"format": 99, "workload": "control"}))
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "format 99" in err and "reads format 1" in err and len(err.splitlines()) == 1
