"""The control workload's metrics: every key its rows carry, with its TensorBoard section
(see `rlhf_ray.runtime.metrics`), and its progress line."""

from __future__ import annotations

from typing import Any

from rlhf_ray.runtime.metrics import SHARED, MetricsTable

CONTROL_METRICS: dict[str, str] = {
    **SHARED,
    "env_steps": "counters", "initial_env_steps": "counters",
    "true_return_mean": "charts", "episode_len_mean": "charts", "pred_return_mean": "charts",
    "pred_reward_mean": "charts",
    "rm_train_accuracy": "reward_model", "rm_val_loss": "reward_model",
    "rm_versions_mixed": "reward_model",  # relabelling calls whose scores mixed versions: 0
    "rm_l2_mean": "reward_model",
    "policy_entropy": "losses",  # the policy's entropy: a Gaussian's action noise
    "lr": "losses",  # the policy optimizer's learning rate (a PBT mutation shows here)
    "ppo_iteration_s": "time", "sample_s": "time", "learn_s": "time", "relabel_s": "time",
    "segment_cut_s": "time",
    # query candidates sent to the reward model / answered from the controller's cache of
    # this version's returns (both over the run's present process)
    "candidates_scored": "counters", "candidates_reused": "counters",
}

CONTROL = MetricsTable(
    sections=CONTROL_METRICS,
    # the keys every row has (tests, reports and Tune rely on them)
    required=("iteration", "env_steps", "labels_total", "true_return_mean", "pred_return_mean",
              "rm_val_accuracy", "rm_version", "time_s"),
    progress=[("iter", "iteration", "4d"), ("steps", "env_steps", ">9,"),
              ("true_return", "true_return_mean", "8.1f"),
              ("pred_return", "pred_return_mean", "8.2f"), ("labels", "labels_total", "5d"),
              ("rm_acc", "rm_val_accuracy", ".3f"), ("rm_v", "rm_version", "d")],
    step_key="env_steps",
    # old name -> new name: both are written until release 0.3 (renamed in 0.2)
    aliases={"kl_coeff": "kl_coef", "rm_train_time_s": "rm_train_s"},
)


def find_metric(result: dict, key: str) -> Any:
    """The value of `key` anywhere in RLlib's nested result dict (first found, depth-first)."""
    if key in result:
        return result[key]
    for value in result.values():
        if isinstance(value, dict):
            found = find_metric(value, key)
            if found is not None:
                return found
    return None
