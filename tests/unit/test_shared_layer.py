"""The layer both controllers share, without Ray: the run folder and the one resume path,
the placement plan, the metrics registry, the round rules, the env probe, quiet output."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from rlhf_ray.config import load_config
from rlhf_ray.errors import ConfigError
from rlhf_ray.runtime.run_dir import RunDir

CONTROL, LLM = "hopper-smoke", "llm-tiny-smoke"


@pytest.mark.parametrize("preset", [CONTROL, LLM])
def test_the_run_folder_names_the_run_and_its_store(preset, tmp_path):
    """A given folder (a path or a URI) is the run folder and names the run, so a run resumed
    from its folder finds its store again (the LLM side once made up a new name); without
    one, the run folder is <run.storage_path>/<name>, on a local disk and under a URI alike,
    and everything the run keeps is under it."""
    local = RunDir(load_config(preset), tmp_path / "runs" / "r1")
    assert local.name == "r1" and local.store_root == str(tmp_path / "runs" / "r1" / "preferences")
    assert not local.remote and local.path == tmp_path / "runs" / "r1"
    uri = RunDir(load_config(preset), "s3://bucket/rlhf/r1/")
    assert uri.name == "r1" and uri.uri == "s3://bucket/rlhf/r1" and uri.remote
    assert uri.store_root == "s3://bucket/rlhf/r1/preferences"
    assert uri.loc("checkpoints", "iter_000001") == "s3://bucket/rlhf/r1/checkpoints/iter_000001"
    assert uri.path.is_absolute() and uri.path.name.startswith("r1-")  # the driver's working copy
    named = RunDir(load_config(preset, ["run.run_name=given", "run.storage_path=s3://b"]), None)
    assert named.uri == "s3://b/given" and named.store_root == "s3://b/given/preferences"
    assert str(named) == "s3://b/given"
    made_up = RunDir(load_config(preset, [f"run.storage_path={tmp_path}/runs"]), None)
    assert made_up.name.startswith(preset) and made_up.path == tmp_path / "runs" / made_up.name
    assert made_up.store_root == str(tmp_path / "runs" / made_up.name / "preferences")
    assert RunDir(load_config(preset), f"file://{tmp_path}/f").uri == f"{tmp_path}/f"


def _checkpoint(folder: RunDir, name: str, state: dict):
    path = folder.path / name
    path.mkdir(parents=True)
    (path / "controller.json").write_text(json.dumps(state))
    return path


@pytest.mark.parametrize("preset,key,limit", [(CONTROL, "env_steps", "run.total_env_steps"),
                                              (LLM, "iteration", "run.iterations")])
def test_one_resume_path_refuses_the_same_way_for_both_workloads(preset, key, limit, tmp_path):
    from rlhf_ray.train import controller_class

    cfg = load_config(preset)
    folder = RunDir(cfg, tmp_path / "run")
    budget = controller_class(cfg).budget(cfg)
    assert budget[:2] == (key, limit)
    with pytest.raises(ConfigError, match="not a run folder"):
        folder.resume_point(budget)
    folder.create(cfg)
    # killed before its first checkpoint: resumable (the learners start afresh on its labels)
    assert folder.resume_point(budget) == (None, None)
    ck = _checkpoint(folder, "checkpoints/iter_000002", {"format": 99, "workload": cfg.workload})
    with pytest.raises(ConfigError, match=f"format 99 .* reads format 1 of the {cfg.workload}"):
        folder.resume_point(budget)
    other = "llm" if cfg.workload == "control" else "control"
    (ck / "controller.json").write_text(json.dumps({"format": 1, "workload": other}))
    with pytest.raises(ConfigError, match=f"workload '{other}'"):
        folder.resume_point(budget)
    (ck / "controller.json").write_text(json.dumps(
        {"format": 1, "workload": cfg.workload, "iteration": 2, key: budget[2]}))
    with pytest.raises(ConfigError) as err:
        folder.resume_point(budget)
    assert str(err.value) == (f"--resume {folder.uri}: the run is complete ({budget[2]} {key} >= "
                              f"{limit}={budget[2]}); raise {limit} to go on")
    (ck / "controller.json").write_text(json.dumps(
        {"format": 1, "workload": cfg.workload, "iteration": 2, key: budget[2] - 1}))
    assert folder.resume_point(budget)[0] == str(ck)


def test_the_latest_checkpoint_is_the_furthest_one(tmp_path):
    """`final/` of a finished run, then a resumed run killed after iter_000012: the newer
    checkpoint wins; an incomplete one (no controller.json) never does."""
    folder = RunDir(load_config(LLM), tmp_path / "run")
    _checkpoint(folder, "final", {"iteration": 10})
    assert folder.latest_checkpoint() == str(folder.path / "final")
    later = _checkpoint(folder, "checkpoints/iter_000012", {"iteration": 12})
    (folder.path / "checkpoints" / "iter_000014").mkdir()  # killed while writing it
    assert folder.latest_checkpoint() == str(later)


def test_superseded_metrics_rows_move_aside(tmp_path):
    folder = RunDir(load_config(CONTROL), tmp_path / "run")
    folder.path.mkdir(parents=True)
    folder.metrics_path.write_text("".join(json.dumps({"iteration": i}) + "\n" for i in (1, 2, 3))
                                   + '{"iteration": 4, "cut sh')
    folder.truncate_metrics(2)
    assert [json.loads(x)["iteration"] for x in folder.metrics_path.read_text().splitlines()] == [1, 2]
    assert len((folder.path / "metrics.superseded.jsonl").read_text().splitlines()) == 2


def test_placement_plan_pins_each_role_to_its_bundle():
    from rlhf_ray import workloads
    from rlhf_ray.runtime.placement import placement_plan

    def of(cfg):
        return workloads.of(cfg).placement(cfg)

    plan = placement_plan(of(load_config(CONTROL, ["placement.num_env_runners=2"])))
    # the driver holds the in-driver learner; empty bundles are left out (RLlib places its own)
    assert plan.bundles[0] == {"CPU": 1.0}
    assert plan.roles == {"env_runner": [1, 2], "reward_trainer": [3]}
    assert plan.bundle("reward_trainer") == 3 and plan.bundle("learner") is None
    plan = placement_plan(of(load_config(CONTROL, ["placement.num_learners=2",
                                                   "placement.learner.resources={learner: 1}",
                                                   "placement.learner.num_cpus=1"])))
    assert plan.bundles[0] == {"CPU": 0.25}
    assert [plan.bundles[i] for i in plan.roles["learner"]] == [{"CPU": 1.0, "learner": 1.0}] * 2
    llm = placement_plan(of(load_config(LLM, ["placement.num_generation_workers=2",
                                              "placement.num_learners=2",
                                              "placement.generation_worker.num_cpus=0",
                                              "ppo.micro_batch_size=8"])), driver={"CPU": 0.01})
    assert llm.bundles[0] == {"CPU": 0.01}
    assert llm.roles == {"generation": [1, 2], "learner": [3, 4], "reward_trainer": [5]}
    assert llm.bundles[1] == {"CPU": 0.01}  # an actor asking for nothing still gets its own


def test_metrics_registry_covers_the_required_keys_and_aliases():
    from rlhf_ray.control.metrics import CONTROL
    from rlhf_ray.llm.metrics import LLM
    from rlhf_ray.runtime.metrics import SHARED

    for table in (CONTROL, LLM):
        assert set(table.required) <= set(table.sections)
        assert set(SHARED) <= set(table.sections)  # what both write means the same in both
        assert set(table.aliases.values()) <= set(table.sections)
        assert not set(table.aliases) & set(table.sections)  # an old name is never a new one
    assert {"kl_coef", "kl_mean", "rm_train_s", "labels_total", "rm_version"} <= set(SHARED)
    row = CONTROL.with_aliases({"iteration": 3, "kl_coef": 0.3, "rm_train_s": 1.5})
    assert row["kl_coeff"] == 0.3 and row["rm_train_time_s"] == 1.5
    assert "kl_coeff" not in LLM.with_aliases({"kl_coef": 0.3})
    line = CONTROL.progress_line({"iteration": 3, "env_steps": 12000, "true_return_mean": 10.0,
                                  "time_s": 4.2})
    assert line.startswith("iter    3 | steps    12,000 | true_return     10.0 | pred_return -")
    assert line.endswith("| 4s")


def test_round_rules():
    from rlhf_ray.feedback.loop import Round, by_label_growth, on_new_labels

    grow = by_label_growth(0.1)
    assert grow(Round(total=110, at_last_round=100, new=True, restarted=False))
    assert not grow(Round(total=105, at_last_round=100, new=True, restarted=False))
    assert grow(Round(total=1, at_last_round=0, new=True, restarted=False))
    assert not grow(Round(total=100, at_last_round=100, new=False, restarted=True))
    assert by_label_growth(0.0)(Round(total=101, at_last_round=100, new=True, restarted=False))
    assert on_new_labels(Round(5, 5, new=True, restarted=False))
    assert on_new_labels(Round(5, 5, new=False, restarted=True))
    assert not on_new_labels(Round(5, 5, new=False, restarted=False))


def test_the_env_is_built_once_for_everything_the_set_up_needs(monkeypatch):
    """Spaces, dt, the info layout and the action bounds come from one probe; the reward
    model's spec and RLlib's config are made from it without building the env again."""
    from rlhf_ray.control import envs
    from rlhf_ray.control import rllib as rllib_glue
    from rlhf_ray.control.reward import RewardNetSpec
    from rlhf_ray.core.segments import default_segment_length

    made = []
    real = envs.make_env
    monkeypatch.setattr(envs, "make_env", lambda c: made.append(c) or real(c))
    cfg = load_config(CONTROL)
    probe = envs.probe(cfg.env.model_dump(mode="json"))
    spec = RewardNetSpec.for_env(cfg.reward_net(), probe.observation_space, probe.action_space,
                                 cfg.reward_model)
    rllib_glue.build_ppo_config(cfg, probe, relabel=rllib_glue.RelabelTarget("app", "RewardModel"),
                                segments={"layout": probe.layout})
    assert len(made) == 1
    assert spec.obs_shape == (11,) and spec.act_dim == 3 and not spec.discrete
    assert probe.layout.nq == 6 and probe.layout.nv == 6
    assert abs(probe.dt - 0.008) < 1e-9 and default_segment_length(probe.dt, 1.5) > 1
    low, high = probe.action_bounds
    assert (low == -1).all() and (high == 1).all()


def test_quiet_sends_everything_but_the_runs_own_lines_to_the_log(tmp_path):
    """What the process writes to its file descriptors 1 and 2 -- as Ray's C++ core does --
    and Python logging and warnings go to the log; `note` and `progress` reach the
    terminal; an error is written to the log with its traceback and still raised."""
    log = tmp_path / "run" / "driver.log"
    script = textwrap.dedent(f"""
        import logging, os, sys, warnings
        from rlhf_ray.runtime import console
        logging.basicConfig(level=logging.INFO)  # a handler on sys.stderr, made before
        with console.quiet({str(log)!r}):
            os.write(2, b"C++ core line\\n")
            os.write(1, b"raw stdout line\\n")
            logging.getLogger("ray").warning("python logging line")
            warnings.warn("a deprecation line")
            print("a print")
            console.note("run folder: here")
            console.progress("iter    1 | ok")
        console.note("after")
        try:
            with console.quiet({str(log)!r}):
                raise RuntimeError("boom")
        except RuntimeError:
            console.note("caught")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["iter    1 | ok"]
    assert out.stderr.splitlines() == ["run folder: here", "after", "caught"]
    text = log.read_text()
    for line in ("C++ core line", "raw stdout line", "python logging line", "a deprecation line",
                 "a print", "RuntimeError: boom", "Traceback"):
        assert line in text, line


def test_an_unregistered_metric_fails_the_write_under_strict_metrics(tmp_path, monkeypatch):
    import pytest

    from rlhf_ray.control.metrics import CONTROL
    from rlhf_ray.runtime.metrics import MetricsWriter

    w = MetricsWriter(tmp_path, CONTROL)
    try:
        monkeypatch.setenv("RLHF_RAY_STRICT_METRICS", "1")
        with pytest.raises(ValueError, match="made_up_s: not registered"):
            w.write({"iteration": 1, "made_up_s": 1.0})
        w.write({"iteration": 1, "env_steps": 10, "kl_coeff": 0.2})  # an alias is known
        monkeypatch.setenv("RLHF_RAY_STRICT_METRICS", "0")  # a user's run: filed under other/
        w.write({"iteration": 2, "made_up_s": 1.0})
    finally:
        w.close()
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and "made_up_s" in rows[1]


def test_phase_timer_names_each_phase():
    import time

    from rlhf_ray.runtime.metrics import PhaseTimer

    t = PhaseTimer()
    time.sleep(0.01)
    t.mark("generate")
    t.mark("score")
    s = t.seconds()
    assert list(s) == ["generate_s", "score_s"] and s["generate_s"] >= 0.01
    assert t.total_s >= s["generate_s"] + s["score_s"] - 1e-3
