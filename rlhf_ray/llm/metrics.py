"""The LLM workload's metrics: every key its rows carry, with its TensorBoard section (see
`rlhf_ray.runtime.metrics`), its progress line, and the two things the controller writes from
them: an iteration's row and `resources.json`."""

from __future__ import annotations

import json

import numpy as np

from rlhf_ray.runtime.memory import peak_memory, peak_rss_mb
from rlhf_ray.runtime.metrics import SHARED, MetricsTable, clean

LLM_METRICS: dict[str, str] = {
    **SHARED,
    "oracle_score_mean": "charts", "sft_oracle_score_mean": "charts", "rm_score_mean": "charts",
    "response_len_mean": "charts", "tokens_per_s": "charts",
    "truncated_frac": "charts",  # responses cut at generation.max_new_tokens, not ended
    "kl_coef_next": "losses", "pg_loss": "losses", "vf_loss": "losses", "approx_kl": "losses",
    "kl_loss": "losses",  # ppo.kl.placement=loss: the KL term of the policy loss (before beta)
    "clipfrac": "losses", "lr": "losses",  # the policy's learning rate (ppo.lr_schedule)
    "policy_version": "counters", "sample_policy_versions": "counters", "policy_lag": "counters",
    "generation_restarts": "counters",
    # ranking queries made of this iteration's rollout groups (ppo.samples_per_prompt =
    # labels.responses_per_query): sampled once for the group baseline and the labels
    "queries_from_rollout": "counters",
    # the reward normalization (raw - mean) / std in force: measured on SFT samples, again
    # for each new reward-model version
    "reward_norm_mean": "reward_model", "reward_norm_std": "reward_model",
    # the sampler against the learner on the same tokens (lm_ppo.sampler_correction), where
    # the sampler's log-probs are compared with the learner's (ppo.old_logprobs=learner)
    "sampler_kl": "losses", "sampler_is_weight_mean": "losses", "sampler_is_clipped_frac": "losses",
    "generation_startup_s": "time",
    "generate_s": "time", "score_s": "time", "learner_s": "time", "sync_s": "time",
    "iteration_s": "time",
    # held-out evaluations (every eval.every iterations and the last): the yardstick's
    # scores (eval_score_mean, and any other it gives, e.g. eval_vader_mean), the reward
    # model's, the SFT model's beside them, and the over-optimization warning
    "eval_score_mean": "charts", "eval_vader_mean": "charts", "eval_rm_score_mean": "charts",
    "sft_eval_score_mean": "charts", "sft_eval_vader_mean": "charts",
    "sft_eval_rm_score_mean": "charts", "rm_judge_diverging": "charts",
    # the alignment tax: held-out human text's perplexity under the policy and the SFT model
    "eval_text_ppl": "charts", "sft_eval_text_ppl": "charts", "ptx_loss": "losses",
}


def _held_out(m: dict) -> str:
    """The progress line's end: the held-out evaluation, and Gao et al.'s warning."""
    line = ""
    if m.get("eval_score_mean") is not None:
        line += f" | held-out {m['eval_score_mean']:.3f} (sft {m.get('sft_eval_score_mean') or 0:.3f})"
    elif m.get("eval_rm_score_mean") is not None:  # no yardstick: the reward model's score
        line += (f" | held-out rm {m['eval_rm_score_mean']:.3f} "
                 f"(sft {m.get('sft_eval_rm_score_mean') or 0:.3f})")
    if m.get("eval_text_ppl") is not None:  # the alignment tax
        line += (f" | text ppl {m['eval_text_ppl']:.2f} "
                 f"(sft {m.get('sft_eval_text_ppl') or 0:.2f})")
    if m.get("rm_judge_diverging"):
        line += " | WARNING rm rising, yardstick not"
    return line


SAMPLER_KEYS = ("sampler_kl", "sampler_is_weight_mean", "sampler_is_clipped_frac")

LLM = MetricsTable(
    sections=LLM_METRICS,
    required=("iteration", "oracle_score_mean", "rm_score_mean", "kl_mean", "kl_coef",
              "response_len_mean", "tokens_per_s", "policy_version"),
    progress=[("iter", "iteration", "4d"), ("oracle", "oracle_score_mean", "6.3f"),
              ("sft", "sft_oracle_score_mean", ".3f"), ("rm", "rm_score_mean", "7.3f"),
              ("kl", "kl_mean", "6.3f"), ("beta", "kl_coef", ".4f"),
              ("len", "response_len_mean", "4.1f"), ("tok/s", "tokens_per_s", "6.0f"),
              ("labels", "labels_total", "d"), ("v", "policy_version", "d")],
    progress_suffix=_held_out,
)


def write_resources(ctl) -> None:
    """`RUN/resources.json`: each role's peak resident memory (MiB) and the run's time,
    for the report (`ctl`: the LLM controller at the end of PPO)."""
    roles = {f"generation_{i}": w for i, w in enumerate(ctl.generation.workers)}
    roles.update({f"learner_{r}": lr for r, lr in enumerate(ctl.learner.ranks)})
    roles.update(reward_trainer=ctl.trainer, labeler=ctl.labeler,
                 weight_store=ctl.feedback.weight_store)
    mem = peak_memory(roles)
    try:
        mem["reward_model_server"] = ctl.rm_handle.info.remote().result(
            timeout_s=30)["peak_rss_mb"]
    except Exception:  # noqa: BLE001 - a replica that is gone: nothing to report
        pass
    mem["controller"] = round(peak_rss_mb(), 1)
    together = round(sum(mem.values()), 1)  # roles alive at once (an upper bound)
    mem.update(ctl.stage_memory)
    (ctl.run_dir / "resources.json").write_text(json.dumps(
        {"peak_rss_mb": mem, "ppo_roles_peak_rss_sum_mb": together,
         "machine_used_peak_mb": ctl.memory_sampler.peak_mb(),
         "ppo_wall_s": ctl.elapsed_s(), "iterations": ctl.iteration}, indent=1))


def iteration_row(ctl, s) -> dict:
    """One PPO iteration's row of `metrics.jsonl` (`ctl`: the LLM controller; `s`: the
    loop's `Step`)."""
    t = s.timer.seconds()
    return {
        "iteration": ctl.iteration,
        "oracle_score_mean": None if s.judged is None else clean(np.mean(s.judged)),
        "sft_oracle_score_mean": clean(ctl.sft_oracle),
        "rm_score_mean": clean(s.raw.mean()),
        "kl_mean": clean(s.stats["kl_mean"]), "kl_coef": clean(s.beta),
        "reward_norm_mean": clean(ctl.norm.mean), "reward_norm_std": clean(ctl.norm.std),
        "kl_coef_next": clean(ctl.kl_ctl.beta),
        "response_len_mean": clean(s.stats["response_len_mean"]),
        "truncated_frac": clean(np.mean(s.out.get("truncated") or
                                        [not f for f in s.out["finished"]])),
        "tokens_per_s": clean(s.out["tokens"] / s.timer.total_s),
        "policy_version": int(s.version),
        "sample_policy_versions": sorted(set(s.out["versions"])),
        "policy_lag": int(s.version - 1 - min(s.out["versions"])),
        "generation_restarts": ctl.generation.restarts,
        "labeler_restarts": ctl.feedback.restarts, "rm_version": int(s.scored["version"]),
        **ctl.feedback.metrics(),
        "pg_loss": clean(s.stats.get("pg_loss")), "vf_loss": clean(s.stats.get("vf_loss")),
        "kl_loss": clean(s.stats.get("kl_loss")), "ptx_loss": clean(s.stats.get("ptx_loss")),
        "queries_from_rollout": ctl.queries_from_rollout,
        "approx_kl": clean(s.stats.get("approx_kl")),
        "clipfrac": clean(s.stats.get("clipfrac")), "lr": clean(s.stats.get("lr")),
        **{k: clean(s.stats.get(k)) for k in SAMPLER_KEYS if k in s.stats},
        "generation_startup_s": clean(s.out.get("startup_s")),
        **t, "iteration_s": round(s.timer.total_s, 3), "time_s": ctl.elapsed_s(),
    }
