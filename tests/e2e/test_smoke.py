"""Smoke presets end to end on the session's local Ray cluster."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from rlhf_ray.config import load_config
from rlhf_ray.train import train
from conftest import assert_own_lines_only
from rlhf_ray.metrics import ALIASES, CONTROL_KEYS, CONTROL_METRICS, read_metrics

# checkpoints every 2 iterations, and the KL penalty on, so PPO's adaptive KL coefficient is
# part of what must come back
OVERRIDES = ["run.checkpoint_every=2", "run.total_env_steps=10000", "ppo.use_kl_loss=true"]
from rlhf_ray.report import report
from rlhf_ray.store import PreferenceStore


def test_hopper_smoke_killed_and_resumed_learns_a_reward_model(ray_cluster, tmp_path):
    """The smoke preset as a user runs it (`rlhf-ray train`, joining the cluster), killed
    with SIGKILL mid-run and continued with `rlhf-ray train --resume RUN_DIR`: one continuous
    run from the last checkpoint -- policy, PPO's KL coefficient, reward model, labels -- that
    ends with the same label budget, no acknowledged label lost or stored twice, and a reward
    model that beats chance."""
    cfg = load_config("hopper-smoke", OVERRIDES)
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

    out = subprocess.run([*cli, "--resume", str(run)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert_own_lines_only(out, run)  # Ray's, RLlib's and Serve's lines are in driver.log
    rows = read_metrics(run)
    for row in rows:
        missing = [k for k in CONTROL_KEYS if k not in row]
        assert not missing, f"metrics lack {missing}"
        unregistered = set(row) - set(CONTROL_METRICS) - set(ALIASES["control"])
        assert not unregistered, f"keys missing from the metrics registry: {unregistered}"
    # one continuous run: the dead run's rows after its checkpoint were superseded
    assert [r["iteration"] for r in rows] == list(range(1, len(rows) + 1))
    assert (run / "metrics.superseded.jsonl").exists()
    assert rows[-1]["env_steps"] >= cfg.run.total_env_steps
    n = state["iteration"]
    first = rows[n]  # the first iteration after the resume
    batch = cfg.ppo.train_batch_size
    assert state["env_steps"] < first["env_steps"] <= state["env_steps"] + 2 * batch
    # PPO's KL coefficient went on from the checkpoint's (RLlib's checkpoint lacks it):
    # one update multiplies it by 0.5, 1 or 1.5
    ratio = first["kl_coeff"] / state["kl_coeffs"]["default_policy"]
    assert min(abs(ratio - f) for f in (0.5, 1.0, 1.5)) < 1e-3, ratio
    assert first["rm_version"] >= state["reward_trainer"]["version"]
    # labels accumulate and end at the budget: every label acknowledged before the kill is
    # there, none twice
    labels = [r["labels_total"] for r in rows]
    assert labels == sorted(labels) and labels[-1] == cfg.labels.budget
    ids = store.labels().column("query_id").to_pylist()
    assert len(ids) == len(set(ids)) == cfg.labels.budget
    assert acked <= set(ids)
    segs = store.segments(store.labels().column("left_id").to_pylist()[:3])
    assert segs.arrays["obs"].shape[1] == cfg.labels.segment_length
    assert "state_qpos" in segs.arrays  # simulator state kept for rendering clips later
    # the reward model beats chance clearly on held-out comparisons, and PPO used its versions
    last = rows[-1]
    assert last["rm_val_accuracy"] > 0.65
    assert last["rm_version"] >= 1
    assert last["pred_return_mean"] is not None and np.isfinite(last["true_return_mean"])
    # run folder: resolved config, TensorBoard events, checkpoints, report; the dead
    # controller's reward-model app was cleaned up
    assert (run / "config.yaml").exists()
    assert list((run / "tb").iterdir())
    final = sorted((run / "checkpoints").iterdir())[-1]
    assert (final / "reward_model.safetensors").exists()
    assert json.loads((final / "controller.json").read_text())["labels_requested"] == cfg.labels.budget
    # the final policy on fresh episodes (the benchmark's yardstick) and its video
    final_eval = json.loads((run / "final_eval.json").read_text())
    assert final_eval["episodes"] >= cfg.run.final_eval_episodes and not final_eval["explore"]
    assert all(np.isfinite(final_eval["returns"]))
    png = report(str(run))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert (run / "final_policy.webm").read_bytes()[:4] == b"\x1a\x45\xdf\xa3"  # WebM
    from ray import serve

    assert f"rlhf-rm-{state['run_id']}" not in serve.status().applications


def test_resume_refuses_what_it_cannot_continue(tmp_path, capsys):
    from rlhf_ray.cli import main
    from rlhf_ray.config import dump_config

    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    run = tmp_path / "run"
    (run / "checkpoints" / "iter_000002").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(load_config("hopper-smoke")))
    assert main(["train", "--resume", str(run)]) == 2
    assert "no checkpoint with a controller.json" in capsys.readouterr().err
    (run / "checkpoints" / "iter_000002" / "controller.json").write_text(
        json.dumps({"format": 99, "workload": "control"}))
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "format 99" in err and "reads format 1" in err and len(err.splitlines()) == 1


def test_pong_smoke_runs_with_the_cnn_reward_model(ray_cluster, tmp_path):
    cfg = load_config("pong-smoke", ["run.total_env_steps=1200"])
    run_dir = train(cfg, run_dir=str(tmp_path / "pong"), progress=False)
    rows = read_metrics(run_dir)
    assert rows[-1]["labels_total"] == cfg.labels.budget
    assert rows[-1]["rm_version"] >= 1
    segs = PreferenceStore(str(run_dir / "preferences")).segments()
    assert segs.arrays["obs"].shape[1:] == (25, 84, 84, 4) and segs.arrays["obs"].dtype == np.uint8
