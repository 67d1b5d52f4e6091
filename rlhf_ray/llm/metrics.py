"""The LLM workload's metrics: every key its rows carry, with its TensorBoard section (see
`rlhf_ray.runtime.metrics`), and its progress line."""

from __future__ import annotations

from rlhf_ray.runtime.metrics import SHARED, MetricsTable

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
}


def _held_out(m: dict) -> str:
    """The progress line's end: the held-out evaluation, and Gao et al.'s warning."""
    line = ""
    if m.get("eval_score_mean") is not None:
        line += f" | held-out {m['eval_score_mean']:.3f} (sft {m.get('sft_eval_score_mean') or 0:.3f})"
    elif m.get("eval_rm_score_mean") is not None:  # no yardstick: the reward model's score
        line += (f" | held-out rm {m['eval_rm_score_mean']:.3f} "
                 f"(sft {m.get('sft_eval_rm_score_mean') or 0:.3f})")
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
