"""Run metrics: one JSON line per iteration in `metrics.jsonl`, mirrored to TensorBoard.

Every key a controller writes is registered here, once, with the TensorBoard section it goes
to (CleanRL's split: `charts/` for what a run is judged by, `losses/` for the optimizer's
view, then `reward_model/`, `labels/`, `time/` and `counters/`). Keys both workloads write
mean the same thing in both; a key is renamed only with its old name written beside it for a
release (`ALIASES`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# what both workloads write
_SHARED = {
    "iteration": "counters", "time_s": "time", "labeling_s": "time",
    "kl_mean": "losses",  # the KL the penalty acts on (control: old vs new policy per PPO
    "kl_coef": "losses",  # update, RLlib's; llm: policy vs the SFT reference per response)
    "labels_total": "labels", "labels_requested": "labels", "labels_pending": "labels",
    "labels_by_source": "labels", "labels_human": "labels", "labels_oracle": "labels",
    "labeler_restarts": "counters",
    "rm_version": "reward_model",  # the version behind the rewards PPO trained on
    "rm_version_published": "reward_model", "rm_val_accuracy": "reward_model",
    "rm_train_loss": "reward_model", "rm_train_s": "time",
}

CONTROL_METRICS: dict[str, str] = {
    **_SHARED,
    "env_steps": "counters", "initial_env_steps": "counters",
    "true_return_mean": "charts", "episode_len_mean": "charts", "pred_return_mean": "charts",
    "pred_reward_mean": "charts",
    "rm_train_accuracy": "reward_model", "rm_val_loss": "reward_model",
    "rm_versions_mixed": "reward_model",  # relabelling calls whose scores mixed versions: 0
    "rm_l2_mean": "reward_model",
    "lr": "losses",  # the policy optimizer's learning rate (a PBT mutation shows here)
    "ppo_iteration_s": "time", "sample_s": "time", "learn_s": "time", "relabel_s": "time",
    "segment_cut_s": "time",
    # query candidates sent to the reward model / answered from the controller's cache of
    # this version's returns (both over the run's present process)
    "candidates_scored": "counters", "candidates_reused": "counters",
}

LLM_METRICS: dict[str, str] = {
    **_SHARED,
    "oracle_score_mean": "charts", "sft_oracle_score_mean": "charts", "rm_score_mean": "charts",
    "response_len_mean": "charts", "tokens_per_s": "charts",
    "kl_coef_next": "losses", "pg_loss": "losses", "vf_loss": "losses", "approx_kl": "losses",
    "clipfrac": "losses",
    "policy_version": "counters", "sample_policy_versions": "counters", "policy_lag": "counters",
    "generation_restarts": "counters",
    "generate_s": "time", "score_s": "time", "learner_s": "time", "sync_s": "time",
    "iteration_s": "time",
    # held-out evaluations (every eval.every iterations and the last): the yardstick's
    # scores (eval_score_mean, and any other it gives, e.g. eval_vader_mean), the reward
    # model's, the SFT model's beside them, and the over-optimization warning
    "eval_score_mean": "charts", "eval_vader_mean": "charts", "eval_rm_score_mean": "charts",
    "sft_eval_score_mean": "charts", "sft_eval_vader_mean": "charts",
    "sft_eval_rm_score_mean": "charts", "rm_judge_diverging": "charts",
}

# old name -> new name, per workload: both are written until release 0.3 (renamed in 0.2)
ALIASES = {"control": {"kl_coeff": "kl_coef", "rm_train_time_s": "rm_train_s"}, "llm": {}}

# the keys every row has (tests, reports and Tune rely on them)
CONTROL_KEYS = ("iteration", "env_steps", "labels_total", "true_return_mean", "pred_return_mean",
                "rm_val_accuracy", "rm_version", "time_s")
LLM_KEYS = ("iteration", "oracle_score_mean", "rm_score_mean", "kl_mean", "kl_coef",
            "response_len_mean", "tokens_per_s", "policy_version")

REGISTRY = {"control": CONTROL_METRICS, "llm": LLM_METRICS}

# the progress line of each workload: (label, key, format)
PROGRESS = {
    "control": [("iter", "iteration", "4d"), ("steps", "env_steps", ">9,"),
                ("true_return", "true_return_mean", "8.1f"),
                ("pred_return", "pred_return_mean", "8.2f"), ("labels", "labels_total", "5d"),
                ("rm_acc", "rm_val_accuracy", ".3f"), ("rm_v", "rm_version", "d")],
    "llm": [("iter", "iteration", "4d"), ("oracle", "oracle_score_mean", "6.3f"),
            ("sft", "sft_oracle_score_mean", ".3f"), ("rm", "rm_score_mean", "7.3f"),
            ("kl", "kl_mean", "6.3f"), ("beta", "kl_coef", ".4f"),
            ("len", "response_len_mean", "4.1f"), ("tok/s", "tokens_per_s", "6.0f"),
            ("labels", "labels_total", "d"), ("v", "policy_version", "d")],
}


def clean(x) -> float | None:
    """A metric value for JSON: None for missing, NaN or infinite, else rounded."""
    if x is None:
        return None
    x = float(x)
    return None if not math.isfinite(x) else round(x, 6)


def with_aliases(row: dict, workload: str) -> dict:
    """The row with each renamed key also under its old name."""
    out = dict(row)
    for old, new in ALIASES[workload].items():
        if new in row and old not in row:
            out[old] = row[new]
    return out


def progress_line(m: dict, workload: str) -> str:
    parts = []
    for label, key, spec in PROGRESS[workload]:
        v = m.get(key)
        parts.append(f"{label} {'-' if v is None else format(v, spec)}")
    line = " | ".join(parts) + f" | {m.get('time_s', 0):.0f}s"
    if m.get("eval_score_mean") is not None:
        line += f" | held-out {m['eval_score_mean']:.3f} (sft {m.get('sft_eval_score_mean') or 0:.3f})"
    if m.get("rm_judge_diverging"):
        line += " | WARNING rm rising, yardstick not"
    return line


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


class MetricsWriter:
    """Appends rows to `metrics.jsonl` and TensorBoard (`tb/`, each key in its registered
    section, aliases left out; a key missing from the registry goes to `other/`)."""

    def __init__(self, run_dir: Path, workload: str = "control"):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.sections = REGISTRY[workload]
        self.aliases = set(ALIASES[workload])
        self._f = open(self.path, "a", buffering=1)
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            self.tb = None

    def write(self, metrics: dict) -> None:
        self._f.write(json.dumps(metrics) + "\n")
        if self.tb is None:
            return
        step = int(metrics.get("env_steps", metrics.get("iteration", 0)))
        for key, value in metrics.items():
            if key in self.aliases:
                continue
            tag = f"{self.sections.get(key, 'other')}/{key}"
            if isinstance(value, (int, float)) and key not in ("iteration", "env_steps"):
                self.tb.add_scalar(tag, value, step)
            elif isinstance(value, dict):
                for k2, v2 in value.items():
                    if isinstance(v2, (int, float)):
                        self.tb.add_scalar(f"{tag}/{k2}", v2, step)
        self.tb.flush()  # the events are on disk before the folder is pushed

    def close(self) -> None:
        self._f.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """A run's rows, from its folder (a path or a URI)."""
    from rlhf_ray import storage

    path = storage.join(storage.normalize(run_dir), "metrics.jsonl")
    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a run folder?)") from None
    return [json.loads(line) for line in text.splitlines() if line.strip()]
