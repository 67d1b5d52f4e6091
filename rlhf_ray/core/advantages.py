"""Advantage estimators for language-model RL, one pure function each, and the loss
aggregation modes they come with.

Every estimator but GAE needs no critic: its baseline comes from the other responses to the
same prompt (a *group* of K, laid out consecutively: rows g*K .. g*K+K-1 answer prompt g) or
from the whole batch. All take

    scores:     [B]     the reward model's score of each response (sequence level)
    kl_rewards: [B, T]  the per-token KL penalty already in reward form, -beta * KL_t
                        (zeros where the KL is a loss term instead, or beta is 0)
    mask:       [B, T]  1 on real response tokens, right padded

and return (advantages, returns), both [B, T] and 0 on padding. With no KL in the reward
and gamma = 1, every token of a response gets the same advantage, its sequence-level one.

- `grpo`: (r - mean_group) / (std_group + eps), Shao et al. 2024 (DeepSeekMath, arXiv
  2402.03300), outcome supervision; std with Bessel's correction, as TRL and verl take it.
- `dr_grpo`: r - mean_group, Liu et al. 2025 ("Understanding R1-Zero-Like Training", arXiv
  2503.20783): no std (it weights easy prompts up), with token-sum aggregation
  (`agg_loss(..., "seq-mean-token-sum-norm")`) instead of a per-response length mean.
- `rloo`: r - mean of the *other* K-1 responses, Ahmadian et al. 2024 ("Back to Basics",
  arXiv 2402.14740) after Kool et al. 2019: K/(K-1) (r - mean_group), an unbiased baseline.
- `reinforce_pp`: REINFORCE++ (Hu 2025, arXiv 2501.03262): the discounted return of the
  token rewards (score on the last token, KL penalty on every token), whitened over the
  whole batch (no group needed; K = 1 works).
- `reinforce_pp_baseline`: REINFORCE++-baseline: the group mean subtracted from the scores
  first, then as `reinforce_pp`.

The group estimators with the KL in the reward add the per-token penalty after the baseline
and sum it forward (OpenRLHF's order), so their advantages vary along the response.
"""

from __future__ import annotations

from typing import Callable

import torch

from rlhf_ray.core.lm_ppo import kl_estimate, masked_whiten

Allreduce = Callable[..., list[float]]


def grouped(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B] -> [B / K, K]: each row one prompt's K responses (consecutive in the batch)."""
    if group_size < 1 or scores.shape[0] % group_size:
        raise ValueError(f"a batch of {scores.shape[0]} responses does not split into groups "
                         f"of {group_size} (responses per prompt)")
    return scores.reshape(-1, group_size)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = sum_{s >= t} gamma^(s - t) r_s over real tokens. rewards, mask: [B, T] -> [B, T]."""
    mask_f = mask.to(rewards.dtype)
    out = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask_f[:, t]
        out[:, t] = running
    return out


def _from_scores(shaped: torch.Tensor, kl_rewards: torch.Tensor, mask: torch.Tensor,
                 gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Shaped sequence scores [B] on the last token, the KL penalty on every token, summed
    forward: (advantages, returns), the same tensor twice (no critic to regress)."""
    rewards = kl_rewards * mask.to(kl_rewards.dtype)
    last = mask.long().sum(1) - 1  # the last real token (every response has one)
    rewards[torch.arange(len(last), device=rewards.device), last] += shaped.to(rewards.dtype)
    ret = discounted_returns(rewards, mask, gamma)
    return ret, ret


def grpo(scores: torch.Tensor, kl_rewards: torch.Tensor, mask: torch.Tensor, group_size: int,
         gamma: float = 1.0, eps: float = 1e-6, allreduce: Allreduce | None = None,
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO: each score standardized within its group (mean and unbiased std over K)."""
    return token_advantages("grpo", shape_scores("grpo", scores, group_size, eps), kl_rewards,
                            mask, gamma, allreduce)


def dr_grpo(scores: torch.Tensor, kl_rewards: torch.Tensor, mask: torch.Tensor,
            group_size: int, gamma: float = 1.0, allreduce: Allreduce | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dr. GRPO: each score minus its group's mean, no division by the std."""
    return token_advantages("dr_grpo", shape_scores("dr_grpo", scores, group_size), kl_rewards,
                            mask, gamma, allreduce)


def rloo(scores: torch.Tensor, kl_rewards: torch.Tensor, mask: torch.Tensor, group_size: int,
         gamma: float = 1.0, allreduce: Allreduce | None = None,
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO: each score minus the mean of the other K - 1 scores of its group."""
    return token_advantages("rloo", shape_scores("rloo", scores, group_size), kl_rewards,
                            mask, gamma, allreduce)


def reinforce_pp(scores: torch.Tensor, kl_rewards: torch.Tensor, mask: torch.Tensor,
                 group_size: int = 1, gamma: float = 1.0, allreduce: Allreduce | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++: discounted returns of the token rewards, whitened over the batch (over
    every learner rank's shard with `allreduce`, as one batch)."""
    return token_advantages("reinforce_pp", scores, kl_rewards, mask, gamma, allreduce)


def reinforce_pp_baseline(scores: torch.Tensor, kl_rewards: torch.Tensor, mask: torch.Tensor,
                          group_size: int, gamma: float = 1.0,
                          allreduce: Allreduce | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++-baseline: the group's mean score subtracted, then as `reinforce_pp`."""
    return token_advantages("reinforce_pp_baseline",
                            shape_scores("reinforce_pp_baseline", scores, group_size),
                            kl_rewards, mask, gamma, allreduce)


CRITIC_FREE = {"grpo": grpo, "dr_grpo": dr_grpo, "rloo": rloo, "reinforce_pp": reinforce_pp,
               "reinforce_pp_baseline": reinforce_pp_baseline}
ESTIMATORS = ("gae", *CRITIC_FREE)  # gae: `lm_ppo.gae`, with a critic
GROUPED = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")  # need K >= 2 per prompt


# Each critic-free estimator in two halves, so that a distributed learner never needs a whole
# group on one rank: `shape_scores` (sequence level: the group baseline, on whoever holds the
# whole batch) and `token_advantages` (per token, row by row, with the batch-wide whitening
# of REINFORCE++ through `allreduce`). The estimators above are the two composed.
def shape_scores(estimator: str, scores: torch.Tensor, group_size: int,
                 eps: float = 1e-6) -> torch.Tensor:
    """[B] -> [B]: the scores less their group baseline (scaled by the group's std, plus
    `eps`, for GRPO; unchanged for REINFORCE++, whose baseline is the batch whitening)."""
    if estimator not in CRITIC_FREE:
        raise ValueError(f"unknown critic-free estimator {estimator!r}: use one of "
                         f"{', '.join(CRITIC_FREE)}")
    if estimator == "reinforce_pp":
        return scores
    g = grouped(scores.float(), group_size)
    if estimator in ("grpo", "rloo") and group_size < 2:
        why = "a group's std" if estimator == "grpo" else "a leave-one-out baseline"
        raise ValueError(f"{estimator} needs at least 2 responses per prompt ({why})")
    mean = g.mean(1, keepdim=True)
    if estimator == "grpo":
        out = (g - mean) / (g.std(1, keepdim=True) + eps)
    elif estimator == "rloo":
        out = g - (g.sum(1, keepdim=True) - g) / (group_size - 1)
    else:  # dr_grpo, reinforce_pp_baseline
        out = g - mean
    return out.reshape(-1).to(scores.dtype)


def token_advantages(estimator: str, shaped: torch.Tensor, kl_rewards: torch.Tensor,
                     mask: torch.Tensor, gamma: float = 1.0, allreduce: Allreduce | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [B, T] from shaped scores [B] (`shape_scores`) and the per-token
    KL penalty in reward form; REINFORCE++'s advantages whitened over the whole batch."""
    adv, ret = _from_scores(shaped, kl_rewards, mask, gamma)
    if estimator in ("reinforce_pp", "reinforce_pp_baseline"):
        adv = masked_whiten(ret, mask, allreduce=allreduce)
    return adv, ret


def default_agg(estimator: str) -> str:
    """The loss aggregation each estimator's paper uses: GRPO's per-response token mean,
    Dr. GRPO's constant-normalized token sum, a token mean for the rest (PPO, RLOO and
    REINFORCE++ as OpenRLHF runs them)."""
    return {"grpo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum-norm"}.get(
        estimator, "token-mean")

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
             "seq-mean-token-sum-norm")


def agg_weights(mask: torch.Tensor, mode: str, num_seqs: float, num_tokens: float,
                norm_len: int) -> torch.Tensor:
    """Per-token weights [B, T] (0 on padding) such that sum(terms * weights) over a whole
    minibatch is `agg_loss(terms, mask, mode, norm_len)`, when the minibatch is split into
    micro batches and learner ranks: `num_seqs` and `num_tokens` are the whole minibatch's
    response and token counts (all ranks), so each part's sum is its share."""
    m = mask.float()
    if mode == "token-mean":
        return m / max(num_tokens, 1.0)
    if mode == "seq-mean-token-mean":
        return m / m.sum(1, keepdim=True).clamp_min(1.0) / max(num_seqs, 1.0)
    if mode == "seq-mean-token-sum":
        return m / max(num_seqs, 1.0)
    if mode == "seq-mean-token-sum-norm":
        return m / float(norm_len) / max(num_seqs, 1.0)
    raise ValueError(f"unknown loss aggregation {mode!r}: use one of {', '.join(AGG_MODES)}")


def agg_loss(terms: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
             norm_len: int | None = None) -> torch.Tensor:
    """Aggregate per-token loss terms [B, T] over real tokens into a scalar (verl's modes):

    - token-mean: every real token of the batch weighs the same (PPO here, DAPO);
    - seq-mean-token-mean: each response's token mean, then the mean over responses (GRPO
      as published: a long response's tokens weigh less);
    - seq-mean-token-sum: each response's token sum, then the mean over responses;
    - seq-mean-token-sum-norm: token sums over a constant `norm_len` (default T), then the
      mean over responses (Dr. GRPO: no length bias either way).
    """
    m = mask.to(terms.dtype)
    if mode == "token-mean":
        return (terms * m).sum() / m.sum().clamp_min(1.0)
    per_seq = (terms * m).sum(1)
    if mode == "seq-mean-token-mean":
        per_seq = per_seq / m.sum(1).clamp_min(1.0)
    elif mode == "seq-mean-token-sum-norm":
        per_seq = per_seq / float(norm_len or terms.shape[1])
    elif mode != "seq-mean-token-sum":
        raise ValueError(f"unknown loss aggregation {mode!r}: use one of {', '.join(AGG_MODES)}")
    return per_seq.mean()


def kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
            estimator: str = "k3", clamp: float | None = 10.0,
            mode: str = "token-mean") -> torch.Tensor:
    """The KL to the reference as a loss term (GRPO's placement, not in the reward):
    the per-token estimate (`lm_ppo.kl_estimate`; k3 by default, unbiased and >= 0) clamped
    to [-clamp, clamp] as verl and OpenRLHF clamp it (one token whose reference probability
    underflows would otherwise dominate), aggregated as the policy loss is. [B, T] -> []."""
    kl = kl_estimate(logprobs, ref_logprobs, estimator)
    if clamp is not None:
        kl = kl.clamp(-clamp, clamp)
    return agg_loss(kl, mask, mode)
