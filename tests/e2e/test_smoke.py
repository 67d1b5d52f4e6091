"""Smoke presets end to end on the session's local Ray cluster."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import assert_own_lines_only

from rlhf_ray.config import load_config
from rlhf_ray.control.metrics import CONTROL
from rlhf_ray.runtime.metrics import read_metrics
from rlhf_ray.storage.store import PreferenceStore
from rlhf_ray.train import train

# checkpoints every 2 iterations, and the KL penalty on, so PPO's adaptive KL coefficient is
# part of what must come back
OVERRIDES = ["run.checkpoint_every=2", "run.total_env_steps=10000", "ppo.use_kl_loss=true"]


def test_hopper_smoke_on_s3_killed_twice_and_resumed_learns_a_reward_model(ray_cluster, s3,
                                                                           tmp_path):
    """The smoke preset as a user runs it on a cluster (`rlhf-ray train ...
    run.storage_path=s3://...`, joining the cluster), its run folder on a real S3-protocol
    server. Killed (SIGKILL) before its first checkpoint, it is resumed by a process with
    another working dir and another cache (another node, as far as the run can tell): the
    learners start afresh on the labels already stored. Killed again mid-run, between
    checkpoints, and resumed the same way, it continues from the last checkpoint -- policy,
    PPO's KL coefficient, reward model, labels -- and ends with the same label budget, no
    acknowledged label lost or stored twice, and a reward model that beats chance. Nothing is
    written under any job's working dir."""
    from rlhf_ray.runtime.serving import serve_apps
    from rlhf_ray.storage import locations

    apps_before = serve_apps()
    cfg = load_config("hopper-smoke", OVERRIDES)
    run = s3("smoke") + "/r"
    base = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    cli = [sys.executable, "-m", "rlhf_ray.cli", "train"]

    def job(i: int) -> tuple[dict, str]:  # a fresh working dir and cache, as on another node
        cwd = tmp_path / f"job{i}"
        cwd.mkdir()
        return dict(base, RLHF_RAY_CACHE=str(tmp_path / f"cache{i}")), str(cwd)

    def rows() -> list[dict]:
        try:
            return read_metrics(run)
        except FileNotFoundError:
            return []

    def has_ckpt(it: int) -> bool:
        return locations.exists(f"{run}/checkpoints/iter_{it:06d}/controller.json")

    def kill_when(args: list[str], i: int, ready) -> tuple[str, set]:
        env, cwd = job(i)
        proc = subprocess.Popen([*cli, *args], env=env, cwd=cwd, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0].decode()[-3000:]
        proc.send_signal(signal.SIGKILL)
        out = proc.communicate()[0].decode()
        assert os.listdir(cwd) == [], os.listdir(cwd)  # nothing in the job's working dir
        return out, set(PreferenceStore(f"{run}/preferences").labels().column("query_id").to_pylist())

    # 1. killed after its first iteration, before its first checkpoint (iteration 2)
    _, young = kill_when(["hopper-smoke", "--quiet", "run.storage_path=" + run.rsplit("/", 1)[0],
                          "run.run_name=r", *OVERRIDES], 1, lambda: len(rows()) >= 1)
    assert young and not has_ckpt(2)
    # 2. resumed with no checkpoint: starts afresh on the stored labels, killed after iter 3
    out2, acked = kill_when(["--resume", run, "--quiet"], 2,
                            lambda: has_ckpt(2) and len(rows()) >= 3)
    assert f"resuming {run}: it has no checkpoint yet; the learners start afresh on the " \
           f"{len(young)} labels in its store" in out2
    assert young <= acked
    ckpt = f"{run}/checkpoints/iter_000002"
    state = json.loads(locations.read_text(ckpt + "/controller.json"))
    assert state["kl_coeffs"] and locations.is_dir(ckpt + "/pool")
    # PPO's KL coefficient in the checkpoint set to a value no restart from the config's
    # (kl_coeff x 0.5, 1 or 1.5 after one update) can give: a resume that drops it shows
    planted = 0.0123
    assert min(abs(planted / cfg.ppo.kl_coeff - f) for f in (0.5, 1.0, 1.5)) > 0.1
    state["kl_coeffs"] = {k: planted for k in state["kl_coeffs"]}
    locations.write_text(ckpt + "/controller.json", json.dumps(state))
    # 3. resumed from the checkpoint on S3, with another learning rate (as a PBT mutation)
    env, cwd = job(3)
    out = subprocess.run([*cli, "--resume", run, "ppo.lr=0.0001"], env=env, cwd=cwd,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert os.listdir(cwd) == []
    assert_own_lines_only(out, run)  # Ray's, RLlib's and Serve's lines are in its driver.log
    rows = read_metrics(run)
    for row in rows:
        missing = [k for k in CONTROL.required if k not in row]
        assert not missing, f"metrics lack {missing}"
        unregistered = CONTROL.unregistered(row)
        assert not unregistered, f"keys missing from the metrics registry: {unregistered}"
    # one continuous run: the dead runs' rows after their last checkpoint were superseded
    assert [r["iteration"] for r in rows] == list(range(1, len(rows) + 1))
    assert locations.is_file(run + "/metrics.superseded.jsonl")
    assert rows[-1]["env_steps"] >= cfg.run.total_env_steps
    n = state["iteration"]
    first = rows[n]  # the first iteration after the resume
    batch = cfg.ppo.train_batch_size
    assert state["env_steps"] < first["env_steps"] <= state["env_steps"] + 2 * batch
    # PPO's KL coefficient went on from the checkpoint's (RLlib's checkpoint lacks it):
    # one update multiplies it by 0.5, 1 or 1.5
    ratio = first["kl_coeff"] / planted
    assert min(abs(ratio - f) for f in (0.5, 1.0, 1.5)) < 1e-3, (first["kl_coeff"], planted)
    assert first["rm_version"] >= state["reward_trainer"]["version"]
    # the new learning rate, not the restored optimizer's
    assert rows[0]["lr"] == pytest.approx(cfg.ppo.lr) != pytest.approx(1e-4)
    assert all(r["lr"] == pytest.approx(1e-4) for r in rows[n:]), [r["lr"] for r in rows]
    # labels accumulate and end at the budget: every label acknowledged before either kill
    # is there, none twice
    labels = [r["labels_total"] for r in rows]
    assert labels == sorted(labels) and labels[-1] == cfg.labels.budget
    store = PreferenceStore(f"{run}/preferences")
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
    # the run folder on S3: resolved config, TensorBoard events, checkpoints, the driver log
    assert "hopper" in locations.read_text(run + "/config.yaml")
    assert locations.listdir(run + "/tb")
    assert "=====" in locations.read_text(run + "/driver.log")
    final = sorted(locations.listdir(run + "/checkpoints"))[-1]
    assert locations.is_file(f"{run}/checkpoints/{final}/reward_model.safetensors")
    assert json.loads(locations.read_text(f"{run}/checkpoints/{final}/controller.json"))[
        "labels_requested"] == cfg.labels.budget
    # the final policy on fresh episodes (the benchmark's yardstick); `rlhf-ray report URI`
    # and `rlhf-ray store check URI` work on the run where it lies
    final_eval = json.loads(locations.read_text(run + "/final_eval.json"))
    assert final_eval["episodes"] >= cfg.run.final_eval_episodes and not final_eval["explore"]
    assert all(np.isfinite(final_eval["returns"]))
    # beside it the same number with sampled actions, the policy's action noise on both, and
    # the reward model's predicted return of those episodes against their true return
    sampled = final_eval["sampled"]
    assert sampled["episodes"] == final_eval["episodes"] and all(np.isfinite(sampled["returns"]))
    assert 0 < final_eval["action_std_mean"] < 5 and 0 < sampled["action_std_mean"] < 5
    for part in (final_eval, sampled):
        rm = part["rm"]
        assert len(rm["pred_returns"]) == part["episodes"] and -1 <= rm["corr_steps"] <= 1
    rep = subprocess.run([sys.executable, "-m", "rlhf_ray.cli", "report", run], env=env, cwd=cwd,
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr
    assert rep.stdout.split() == ["final", "policy", "video:", run + "/final_policy.webm",
                                  run + "/report.png"], rep.stdout
    assert locations.read_bytes(run + "/report.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert locations.read_bytes(run + "/final_policy.webm")[:4] == b"\x1a\x45\xdf\xa3"  # WebM
    chk = subprocess.run([sys.executable, "-m", "rlhf_ray.cli", "store", "check", run], env=env,
                         cwd=cwd, capture_output=True, text=True, timeout=120)
    assert chk.returncode == 0 and f"{cfg.labels.budget} labels" in chk.stdout, chk.stdout
    # the killed processes' reward-model apps were removed (they held their replicas' CPUs:
    # one left behind by the run killed before its checkpoint starved later tests' trials)
    assert f"rlhf-rm-{state['run_id']}" not in serve_apps()
    assert not {a for a in serve_apps() if a.startswith("rlhf-")} - apps_before


def test_resume_refuses_what_it_cannot_continue(tmp_path, capsys):
    from rlhf_ray.cli import main
    from rlhf_ray.config import dump_config

    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    run = tmp_path / "run"
    (run / "checkpoints" / "iter_000002").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(load_config("hopper-smoke")))
    (run / "checkpoints" / "iter_000002" / "controller.json").write_text(
        json.dumps({"format": 99, "workload": "control"}))
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "format 99" in err and "reads format 1" in err and len(err.splitlines()) == 1


def test_pong_smoke_runs_with_the_cnn_reward_model(ray_cluster, tmp_path):
    import torch

    cfg = load_config("pong-smoke", ["run.total_env_steps=1200"])
    threads = torch.get_num_threads()
    try:
        run_dir = train(cfg, run_dir=str(tmp_path / "pong"), progress=False)
        # the in-driver learner takes the rollout worker's core while PPO learns
        assert torch.get_num_threads() == cfg.placement.learner_threads == 2
    finally:
        torch.set_num_threads(threads)
    rows = read_metrics(run_dir)
    assert rows[-1]["labels_total"] == cfg.labels.budget
    assert rows[-1]["rm_version"] >= 1
    segs = PreferenceStore(str(run_dir / "preferences")).segments()
    assert segs.arrays["obs"].shape[1:] == (25, 84, 84, 4) and segs.arrays["obs"].dtype == np.uint8


@pytest.mark.parametrize("reward", ["env", "env_standardized"])
def test_the_true_reward_baselines_train_without_a_reward_model(ray_cluster, tmp_path, reward):
    """`run.reward=env` (PPO on the true reward) and `env_standardized` (the same, each train
    batch standardized as the reward model's output is): no labels, no reward model, and a
    final evaluation with mean and sampled actions but no reward model's view."""
    cfg = load_config("hopper-smoke", [f"run.reward={reward}", "run.total_env_steps=6000",
                                       "run.final_eval_episodes=2"])
    run = train(cfg, run_dir=str(tmp_path / reward), progress=False)
    rows = read_metrics(run)
    assert rows and rows[-1]["env_steps"] >= 6000
    assert all(r.get("labels_total", 0) == 0 for r in rows)
    assert all(r.get("pred_return_mean") is None for r in rows)
    # the policy's entropy is logged, and starts where `ppo.log_std_init` puts the noise: a
    # diagonal Gaussian's is sum over action dims of 0.5 ln(2 pi e) + log std (Hopper: 3)
    start = 3 * (0.5 * math.log(2 * math.pi * math.e) + cfg.ppo.log_std_init)
    assert abs(rows[0]["policy_entropy"] - start) < 0.3, (rows[0]["policy_entropy"], start)
    assert not (run / "preferences").exists() or not list((run / "preferences").rglob("*.parquet"))
    final = json.loads((run / "final_eval.json").read_text())
    assert "rm" not in final and "rm" not in final["sampled"]
    assert final["sampled"]["episodes"] == final["episodes"] >= 2
