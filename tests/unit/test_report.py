"""The control report's curves: drawn through the iterations that ended no episode."""

import json

from rlhf_ray.control.report import points
from rlhf_ray.report import report


def _rows():
    # an Atari iteration often ends no episode: its true return is missing
    return [{"iteration": i, "env_steps": 2048 * i, "time_s": 10.0 * i,
             "true_return_mean": None if i % 3 else -21.0 + i, "labels_total": 0}
            for i in range(1, 10)]


def test_a_curve_keeps_only_the_iterations_that_have_the_value():
    xs, ys = points(_rows(), "true_return_mean")
    assert xs == [2048 * 3, 2048 * 6, 2048 * 9] and ys == [-18.0, -15.0, -12.0]
    assert points(_rows(), "pred_return_mean") == ([], [])


def test_a_true_reward_run_is_reported(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    out = report(str(tmp_path))
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
