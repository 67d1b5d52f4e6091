"""benchmarks/control.py's summaries on a record written by hand: ratios from the final
evaluation (not the smoothed curve), throughput from runs that had the machine alone, the
IQM over envs, and a grid that resumes where it stopped."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("control_bench", ROOT / "benchmarks/control.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(final, window, sps, alone):
    curve = [{"env_steps": s, "true_return_mean": window, "time_s": s / sps} for s in (0, 1000)]
    return {"final_return": final, "auc_return": window, "final_window_return": window,
            "env_steps_per_s": sps, "alone": alone, "curve": curve}


def test_summaries_use_final_evaluations_and_runs_alone(tmp_path):
    b = _bench()
    record = {"steps": 1000, "overrides": [], "envs": {}}
    for env, scale, floor in (("Hopper-v5", 1000.0, 0.0), ("Reacher-v5", 10.0, -10.0)):
        record["envs"][env] = {"random_return": {"mean": floor}, "runs": {
            b.TRUE: {str(s): _run(scale * (1 + 0.1 * s), 0.0, 100.0, True) for s in range(3)},
            "RLHF 700 labels": {str(s): _run(scale * 0.9 * (1 + 0.1 * s), 5.0,
                                             90.0 if s else 10.0, bool(s)) for s in range(3)}}}
    b.finish(record, tmp_path, "grid")
    saved = json.loads((tmp_path / "grid.json").read_text())
    hop = saved["envs"]["Hopper-v5"]["summary"]["RLHF 700 labels"]
    assert hop["return_ratio"]["ratio"] == pytest.approx(0.9)
    assert hop["return_ratio"]["ci95"][0] < 0.9 < hop["return_ratio"]["ci95"][1]
    assert hop["final_return"] == pytest.approx([900, 990, 1080])
    assert hop["throughput_ratio"] == pytest.approx(0.9)  # seed 0 (10 steps/s) was not alone
    assert hop["throughput_runs_alone"] == [2, 3]
    # over the random policy's return: (9.9 + 10) / (11 + 10) on the second env
    rea = saved["envs"]["Reacher-v5"]["summary"]["RLHF 700 labels"]["return_ratio"]
    assert rea["ratio"] == pytest.approx(19.9 / 21) and rea["floor"] == -10.0
    agg = saved["aggregate"]["RLHF 700 labels"]
    assert agg["envs"] == 2 and agg["runs_per_task"] == [3, 3]
    normalized = sorted([x / 1100 for x in (900, 990, 1080)] +
                        [(x + 10) / 21 for x in (9, 9.9, 10.8)])
    assert agg["iqm"] == pytest.approx(sum(normalized[1:5]) / 4)  # the middle half of 6
    assert (tmp_path / "grid.png").stat().st_size > 10_000
    table = (tmp_path / "grid.md").read_text()  # the README's tables
    assert "| Reacher-v5 | random policy | | -10.0 | 0 | | |" in table
    assert "| Hopper-v5 | RLHF 700 labels | 3 | 990 [" in table and "| 900, 990, 1,080 |" in table
    assert "| 9.0, 9.9, 10.8 |" in table  # small returns keep a decimal (whole: 9, 10, 11)
    assert f"| RLHF 700 labels | 2 | {agg['iqm']:.2f} [" in table


def test_variants_and_ablations():
    b = _bench()
    v = b.variants([350, 700], ablations=True)
    assert list(v)[:3] == [b.TRUE, "RLHF 350 labels", "RLHF 700 labels"]
    assert "reward_model.random_response_prob=0" in v["RLHF 700 no random-response term"]
    assert "reward_model.ensemble_size=1" in v["RLHF 700 no ensemble"]
    from rlhf_ray.config import load_config

    for overrides in b.ABLATIONS.values():  # every ablation is a valid config
        load_config("hopper", overrides)


def test_the_random_floor_is_measured_in_the_presets_env():
    rand = _bench().random_return("reacher", episodes=3)
    assert rand["episodes"] == 3 and len(rand["returns"]) == 3
    assert rand["mean"] < -5  # Reacher pays the distance to its target: random scores far below 0


def test_throughput_compares_runs_of_one_sitting_only():
    b = _bench()

    def runs(*sps_sitting):
        return {str(i): {"env_steps_per_s": v, "alone": True, "sitting": k}
                for i, (v, k) in enumerate(sps_sitting)}

    # yesterday's machine ran the baseline at 500 steps/s, today's at 1,500: RLHF's 1,350
    # today is 0.9 of today's baseline, not 1.35x a mix of both days
    base = runs((500.0, "day1"), (500.0, "day1"), (1500.0, "day2"))
    t = b.throughput(runs((1350.0, "day2"), (1350.0, "day2")), base)
    assert t["throughput_ratio"] == pytest.approx(0.9)
    assert t["throughput_runs_alone"] == [2, 1] and [p["sitting"] for p in t["throughput_sittings"]] == ["day2"]
    assert b.throughput(runs((1350.0, "day3")), base)["throughput_ratio"] is None
    # runs from before the record kept its sitting: the day their run folder's name ends with
    assert b.sitting({"run_dir": "runs/bench-hopper-true_reward-s0-1796252811"}) == "2026-12-02"


def test_an_env_whose_baseline_is_not_above_random_gets_no_ratio(tmp_path):
    """Ant at 500k steps: true-reward PPO ends where a random policy does, so a ratio over
    the floor divides by about 0; it is shown as none and left out of the IQM."""
    b = _bench()
    record = {"steps": 1000, "overrides": [], "envs": {}}
    for env, base, floor in (("Hopper-v5", 1000.0, 0.0), ("Ant-v5", 1000.0, 990.0)):
        record["envs"][env] = {"random_return": {"mean": floor}, "runs": {
            b.TRUE: {str(s): _run(base + 30 * (s - 1), 0.0, 100.0, True) for s in range(3)},
            "RLHF 700 labels": {str(s): _run(900.0 + s, 0.0, 90.0, True) for s in range(3)}}}
    b.finish(record, tmp_path, "grid")
    saved = json.loads((tmp_path / "grid.json").read_text())
    assert saved["envs"]["Hopper-v5"]["summary"]["RLHF 700 labels"]["baseline_above_floor"]
    assert not saved["envs"]["Ant-v5"]["summary"]["RLHF 700 labels"]["baseline_above_floor"]
    agg = saved["aggregate"]["RLHF 700 labels"]
    assert agg["envs"] == 1 and agg["left_out_baseline_not_above_random"] == ["Ant-v5"]
    assert agg["iqm"] == pytest.approx(0.901)  # Hopper's alone
    table = (tmp_path / "grid.md").read_text()
    assert "| Ant-v5 | RLHF 700 labels | 3 | 901 [" in table
    assert "| none: true reward not above random |" in table
    assert "| RLHF 700 labels | 1 (left out: Ant-v5, true reward not above random) |" in table


def test_an_env_part_way_through_its_seeds_waits_for_the_iqm(tmp_path):
    b = _bench()
    record = {"steps": 1000, "overrides": [], "envs": {}}
    for env, n in (("Hopper-v5", 3), ("Reacher-v5", 1)):
        record["envs"][env] = {"random_return": {"mean": 0.0}, "runs": {
            b.TRUE: {str(s): _run(1000.0 + s, 0.0, 100.0, True) for s in range(3)},
            "RLHF 700 labels": {str(s): _run(500.0, 0.0, 90.0, True) for s in range(n)}}}
    b.finish(record, tmp_path, "grid")
    agg = json.loads((tmp_path / "grid.json").read_text())["aggregate"]["RLHF 700 labels"]
    assert agg["envs"] == 1 and agg["left_out_incomplete"] == ["Reacher-v5"]


def test_an_env_with_both_variants_part_way_waits_for_the_iqm(tmp_path):
    """Hopper at 1M steps after its first seed pair (1 vs 1) beside HalfCheetah's 5 vs 5:
    Hopper's one pair must not enter the IQM as a second env with no interval."""
    b = _bench()
    record = {"steps": 1000, "overrides": [], "envs": {}}
    for env, n in (("HalfCheetah-v5", 3), ("Hopper-v5", 1)):
        record["envs"][env] = {"random_return": {"mean": 0.0}, "runs": {
            b.TRUE: {str(s): _run(1000.0 + s, 0.0, 100.0, True) for s in range(n)},
            "RLHF 700 labels": {str(s): _run(500.0 + 10 * s, 0.0, 90.0, True)
                                for s in range(n)}}}
    b.finish(record, tmp_path, "grid")
    agg = json.loads((tmp_path / "grid.json").read_text())["aggregate"]["RLHF 700 labels"]
    assert agg["envs"] == 1 and agg["left_out_incomplete"] == ["Hopper-v5"]
    assert agg["ci95"][0] == agg["ci95"][0]  # HalfCheetah's 3 seeds: an interval, not nan
    table = (tmp_path / "grid.md").read_text()
    assert "| RLHF 700 labels | 1 (" in table and "Hopper-v5" in table.split("IQM")[-1]


def test_a_run_the_script_was_stopped_in_goes_on_from_its_checkpoint(tmp_path):
    b = _bench()
    entry: dict = {"runs": {}}
    first, resume = b.start_run(entry, "pong", "true reward", 0, tmp_path)
    assert not resume and entry["in_progress"]["true reward"]["0"] == first
    # stopped before its first checkpoint: a new run, not a restart on the old folder
    again, resume = b.start_run(entry, "pong", "true reward", 0, tmp_path)
    assert not resume and entry["in_progress"]["true reward"]["0"] == again
    ckpt = Path(again) / "checkpoints" / "iter_000020"
    (ckpt / "algo").mkdir(parents=True)  # stopped while its checkpoint was being written
    assert b.start_run(entry, "pong", "true reward", 0, tmp_path)[1] is False
    entry["in_progress"]["true reward"]["0"] = again
    (ckpt / "controller.json").write_text('{"iteration": 20}')  # a complete checkpoint
    assert b.start_run(entry, "pong", "true reward", 0, tmp_path) == (again, True)
    b.end_run(entry, "true reward", 0)
    assert "in_progress" not in entry  # nothing left half-done
    # a resumed run's clock starts again: its steps/s leaves out the pair across the restart
    rows = [{"iteration": i, "env_steps": 100 * i, "time_s": t, "true_return_mean": -20.0}
            for i, t in ((1, 10.0), (2, 20.0), (3, 5.0), (4, 15.0))]
    s = b.summarize({"rows": rows, "final_eval": None}, window=2)
    assert s["env_steps_per_s"] == pytest.approx(10.0)
    # and its training time is both sittings', not the last one's
    assert (s["train_s"], s["sittings"]) == (pytest.approx(35.0), 2)


def test_a_single_seed_baseline_above_random_gets_its_ratio(tmp_path):
    """Pong, one seed each: no interval to test the baseline by, so a baseline above the
    random floor counts (the table said "true reward not above random" for +21 vs -20.3);
    one at the floor still does not."""
    b = _bench()
    summary = b.env_summary({b.TRUE: {"0": _run(21.0, 19.6, 171.0, False)},
                             "RLHF 5500 labels": {"0": _run(-1.0, -4.9, 131.0, False)}},
                            floor=-20.3)
    row = summary["RLHF 5500 labels"]
    assert row["baseline_above_floor"]
    assert row["return_ratio"]["ratio"] == pytest.approx(19.3 / 41.3)
    flat = b.env_summary({b.TRUE: {"0": _run(-20.3, 0.0, 1.0, False)},
                          "RLHF 5500 labels": {"0": _run(-1.0, 0.0, 1.0, False)}}, floor=-20.3)
    assert not flat["RLHF 5500 labels"]["baseline_above_floor"]


def test_a_single_seed_gets_no_interval_in_the_tables_or_the_legend(tmp_path):
    """One seed has no bootstrap interval (nan): the legend read "2.01 [nan, nan]"."""
    b = _bench()
    runs = {b.TRUE: {"0": _run(1697.0, 1031.0, 1672.0, True)},
            "RLHF 700 labels": {"0": _run(3684.0, 1900.0, 1597.0, True)}}
    record = {"steps": 1000, "overrides": [], "envs": {
        "HalfCheetah-v5": {"random_return": {"mean": -273.3}, "runs": runs}}}
    b.finish(record, tmp_path, "one")
    summary = record["envs"]["HalfCheetah-v5"]["summary"]["RLHF 700 labels"]
    ratio = (3684.0 + 273.3) / (1697.0 + 273.3)
    assert b.curve_label("RLHF 700 labels", 1, summary) == f"RLHF 700 labels (1 seed): {ratio:.2f}"
    assert "nan" not in (tmp_path / "one.md").read_text()
    two = b.env_summary({b.TRUE: {s: _run(1697.0 + int(s), 0.0, 1.0, True) for s in "01"},
                         "RLHF 700 labels": {s: _run(3684.0 * (1 + int(s)), 0.0, 1.0, True)
                                             for s in "01"}}, floor=-273.3)
    assert b.curve_label("RLHF 700 labels", 2, two["RLHF 700 labels"]).count("[") == 1


def test_the_tables_show_mean_and_sampled_actions_side_by_side(tmp_path):
    """Each seed's mean-action and sampled return, action std and the reward model's view of
    the final policy's episodes, where the runs recorded them; a summary keeps them."""
    b = _bench()
    fe = {"return_mean": 221.0, "episodes": 10, "action_std_mean": 0.61,
          "returns": [40.0, 402.0],
          "rm": {"pred_return_mean": 90.0, "corr_episodes": 0.2, "corr_steps": 0.35},
          "sampled": {"return_mean": 434.0, "action_std_mean": 0.63, "episodes": 10,
                      "returns": [400.0, 468.0], "rm": {"corr_steps": 0.5}}}
    s = b.summarize({"rows": [{"env_steps": 0, "time_s": 0.0, "true_return_mean": 1.0},
                              {"env_steps": 10, "time_s": 1.0, "true_return_mean": 2.0}],
                     "final_eval": fe}, window=1)
    assert (s["final_return"], s["sampled_return"], s["action_std"], s["rm_corr_steps"],
            s["sampled_rm_corr_steps"]) == (221.0, 434.0, 0.61, 0.35, 0.5)
    record = {"steps": 10, "overrides": [], "envs": {"Hopper-v5": {
        "random_return": {"mean": 0.0},
        "runs": {b.TRUE: {"0": {**_run(760.0, 0.0, 100.0, True)}},
                 "RLHF 700 labels": {"0": {**_run(221.0, 0.0, 90.0, True), **s,
                                             "final_eval": fe}}}}}}
    b.finish(record, tmp_path, "grid")
    md = (tmp_path / "grid.md").read_text()
    assert "| Hopper-v5 | RLHF 700 labels | 221 / 434 | 40 / 400 | 0.61 | 0.35 |" in md
    assert "| Hopper-v5 | true reward |" in md.split("The final policy")[0]


def test_rlhf_runs_without_a_true_reward_beside_them_get_no_ratio(tmp_path, capsys):
    """A record of RLHF runs alone (`--no-true-reward`) shows their returns and says there is
    nothing to divide by, in the table and the printed summary, instead of a ratio of 1."""
    b = _bench()
    record = {"steps": 1000, "overrides": [], "envs": {"Walker2d-v5": {
        "random_return": {"mean": 74.4},
        "runs": {"RLHF 700 labels": {s: _run(700.0 + 100 * int(s), 0.0, 100.0, True)
                                     for s in "01"}}}}}
    b.finish(record, tmp_path, "alone")
    md = (tmp_path / "alone.md").read_text()
    assert "| Walker2d-v5 | RLHF 700 labels | 2 |" in md
    assert "no true-reward runs here" in md
    assert "seeds [700 800]" in capsys.readouterr().out
