"""PPO for language models: KL-penalized token rewards, masked GAE, clipped losses, KL control.

The math of InstructGPT's RL step (Ouyang et al. 2022, eq. 2) as Ziegler et al. 2019
("Fine-Tuning Language Models from Human Preferences", arXiv 1909.08593) run it:

    R(x, y) = r_theta(x, y) - beta * log(pi_RL(y | x) / pi_SFT(y | x)),

with the KL term paid per token and the reward-model score on the last response token.
Pure torch: every function takes right-padded [B, T] response tensors and a `mask` that is
1 on real response tokens (up to and including EOS) and 0 on padding, so nothing past EOS
ever reaches a loss, an advantage or a statistic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is 1. x, mask: [B, T]."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  allreduce: Callable[..., list[float]] | None = None) -> torch.Tensor:
    """Normalize x to zero mean and unit variance over the masked positions (padding stays 0).

    x, mask: [B, T]. Advantage whitening; the mean is kept when `shift_mean` is False (as for
    rewards). The moments are float64 sums; `allreduce` sums a few floats over the learner
    ranks (torch.distributed), so N ranks with a shard each whiten exactly as one rank with
    the whole batch (None: this batch alone)."""
    total = allreduce or (lambda *xs: list(xs))
    m = mask.to(x.dtype)
    s, n = total(float((x * m).sum()), float(m.sum()))
    mean = s / max(n, 1.0)
    (ss,) = total(float((((x - mean) ** 2) * m).sum()))
    var = ss / max(n, 1.0)
    out = (x - mean) / float(np.sqrt(var + 1e-8))
    if not shift_mean:
        out = out + mean
    return out * m


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled token's log-probabilities.

    logprobs, ref_logprobs: [B, T] log pi(y_t) and log pi_ref(y_t) of the sampled tokens.
    k1 = log pi - log pi_ref (unbiased, can be negative); k2 = (log r)^2 / 2 and
    k3 = (r - 1) - log r with r = pi_ref / pi (Schulman, "Approximating KL divergence"):
    k3 is unbiased and never negative.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}: use 'k1', 'k2' or 'k3'")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, beta: float,
                  mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards: -beta * KL_t on every response token, plus the reward-model score
    on the last real token of each response.

    scores: [B]; kl, mask: [B, T] (right padding, at least one real token per row) -> [B, T].
    """
    mask_f = mask.to(kl.dtype)
    rewards = -beta * kl * mask_f
    last = mask.long().sum(dim=1) - 1  # index of the last real token
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16) over response tokens.

    rewards, values, mask: [B, T], right padded. The episode ends at the last real token: no
    value is bootstrapped from padding, and nothing at a padded position leaks into a real
    one. Returns (advantages, returns), both [B, T] and 0 on padding; returns = A + V.
    """
    mask_f = mask.to(values.dtype)
    rewards, values = rewards * mask_f, values * mask_f
    b, t = rewards.shape
    adv = torch.zeros_like(rewards)
    last_gae = torch.zeros(b, dtype=rewards.dtype, device=rewards.device)
    for i in reversed(range(t)):
        nxt_mask = mask_f[:, i + 1] if i + 1 < t else torch.zeros_like(last_gae)
        nxt_value = values[:, i + 1] if i + 1 < t else torch.zeros_like(last_gae)
        delta = rewards[:, i] + gamma * nxt_value * nxt_mask - values[:, i]
        last_gae = (delta + gamma * lam * nxt_mask * last_gae) * mask_f[:, i]
        adv[:, i] = last_gae
    return adv, (adv + values) * mask_f


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip: float = 0.2,
                weights: torch.Tensor | None = None,
                token_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), averaged over real tokens.

    All inputs [B, T]. `weights`: per-token importance weights of the sampler's tokens
    (`sampler_correction`), constants multiplying each token's term. `token_weights`: each
    token's share of the loss (`advantages.agg_weights`: another aggregation than the token
    mean, or a micro batch's share of a larger batch); the loss is then the weighted sum.
    Returns (pg_loss, {pg_loss_token_mean, approx_kl, clipfrac}): the terms' mean over real
    tokens (the loss itself without `token_weights`), and approx_kl the k3 estimate of
    KL(old || new) that CleanRL and TRL report.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    terms = torch.maximum(unclipped, clipped)
    if weights is not None:
        terms = terms * weights
    token_mean = masked_mean(terms, mask)
    loss = token_mean if token_weights is None else \
        (terms * token_weights * mask.to(terms.dtype)).sum()
    with torch.no_grad():
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
        clipfrac = masked_mean((clipped > unclipped).to(ratio.dtype), mask)
    return loss, {"pg_loss_token_mean": float(token_mean.detach()),
                  "approx_kl": float(approx_kl), "clipfrac": float(clipfrac)}


def sampler_correction(learner_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor,
                       mask: torch.Tensor, cap: float | None = None
                       ) -> tuple[torch.Tensor | None, dict[str, float]]:
    """How far the sampler's token log-probs are from the learner's for the same tokens
    (another engine's kernels, or, with asynchronous generation, older weights), and the
    truncated importance weights min(pi_learner / pi_sampler, cap) that correct for it
    (TIS: Yao et al. 2025; verl's rollout correction, TRL's vLLM importance sampling).

    All [B, T]. Returns (weights or None without `cap`, {sampler_kl: the k3 estimate of
    KL(sampler || learner) per token, sampler_is_weight_mean, sampler_is_clipped_frac}).
    """
    log_ratio = (learner_logprobs - sampler_logprobs).float()
    ratio = torch.exp(log_ratio)
    stats = {"sampler_kl": float(masked_mean(torch.expm1(log_ratio) - log_ratio, mask))}
    if cap is None:
        return None, stats
    weights = ratio.clamp(max=cap)
    stats.update(sampler_is_weight_mean=float(masked_mean(weights, mask)),
                 sampler_is_clipped_frac=float(masked_mean((ratio > cap).float(), mask)))
    return weights * mask, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip: float | None = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss 0.5 * max((V - R)^2, (V_clipped - R)^2) over real tokens, where
    V_clipped stays within `clip` of the value at sampling time (None: unclipped)."""
    err = (values - returns) ** 2
    if clip is None:
        loss = 0.5 * masked_mean(err, mask)
        return loss, {"vf_clipfrac": 0.0}
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        frac = masked_mean((err_clipped > err).to(values.dtype), mask)
    return loss, {"vf_clipfrac": float(frac)}


def micro_batches(idx: np.ndarray, prompt_lens: np.ndarray, response_lens: np.ndarray,
                  max_rows: int, max_tokens: int | None = None) -> list[np.ndarray]:
    """Split the rows `idx` of a minibatch into micro batches (one forward/backward each).

    Fixed size: `max_rows` rows at a time, in the given order. With `max_tokens` (verl's
    dynamic batch size): rows longest first, packed greedily so that a micro batch padded to
    its own longest prompt and response, rows x (P_max + T_max), holds at most `max_tokens`
    tokens (a row longer than that goes alone). Activation memory follows tokens, not rows,
    so a token budget sizes micro batches by memory whatever the lengths.
    prompt_lens, response_lens: [B] real lengths of every row of the batch.
    """
    idx = np.asarray(idx)
    if max_tokens is None:
        return [idx[s:s + max_rows] for s in range(0, len(idx), max_rows)]
    order = idx[np.argsort(-(prompt_lens[idx] + response_lens[idx]), kind="stable")]
    out: list[np.ndarray] = []
    cur: list[int] = []
    p_max = t_max = 0
    for i in order:
        p, t = max(p_max, int(prompt_lens[i])), max(t_max, int(response_lens[i]))
        if cur and (len(cur) + 1) * (p + t) > max_tokens:
            out.append(np.asarray(cur))
            cur, p, t = [], int(prompt_lens[i]), int(response_lens[i])
        cur.append(int(i))
        p_max, t_max = p, t
    if cur:
        out.append(np.asarray(cur))
    return out


@dataclass
class FixedKLController:
    """beta stays where it was set."""

    beta: float

    def update(self, kl: float, n_steps: int) -> float:
        return self.beta

    def state_dict(self) -> dict:
        return {"kind": "fixed", "beta": self.beta}


@dataclass
class AdaptiveKLController:
    """Ziegler et al. 2019, section 2.2: a proportional controller on log beta.

        e_t = clip(KL_t / target - 1, -0.2, 0.2),   beta_{t+1} = beta_t (1 + K_beta e_t),

    with K_beta = n_steps / horizon (n_steps: samples in the batch that measured KL_t).

    `min_beta` bounds beta from below. Without it, the iterations in which the policy has not
    yet moved (KL far under the target) cut beta by the full 20% clip each time, and once the
    KL does arrive, beta needs as many iterations to climb back as it spent falling: the KL
    overshoots its target by 2x (integral windup; measured on smollm2-reviews, docs/llm.md).
    """

    beta: float
    target: float
    horizon: float = 10_000
    min_beta: float = 0.0

    def update(self, kl: float, n_steps: int) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.beta = max(self.beta * (1.0 + error * n_steps / self.horizon), self.min_beta)
        return self.beta

    def state_dict(self) -> dict:
        return {"kind": "adaptive", "beta": self.beta, "target": self.target,
                "horizon": self.horizon, "min_beta": self.min_beta}


@dataclass
class DoublingKLController:
    """The PPO paper's adaptive KL penalty (Schulman et al. 2017, section 4):

        KL < target / 1.5:  beta <- beta / 2;    KL > target * 1.5:  beta <- beta * 2,

    and beta stays put in between. It reacts within one iteration where Ziegler's rule moves
    beta by at most 20% x n_steps / horizon, and it overshoots more (the paper: "the
    parameters 1.5 and 2 are chosen heuristically, but the algorithm is not very sensitive to
    them"). `min_beta` bounds beta from below, as in `AdaptiveKLController`."""

    beta: float
    target: float
    min_beta: float = 0.0

    def update(self, kl: float, n_steps: int) -> float:
        if kl < self.target / 1.5:
            self.beta = max(self.beta / 2.0, self.min_beta)
        elif kl > self.target * 1.5:
            self.beta *= 2.0
        return self.beta

    def state_dict(self) -> dict:
        return {"kind": "doubling", "beta": self.beta, "target": self.target,
                "min_beta": self.min_beta}


KLController = FixedKLController | AdaptiveKLController | DoublingKLController


def make_kl_controller(controller: str, init_coef: float, target: float, horizon: float,
                       min_coef: float = 0.0) -> KLController:
    """The controller a config names (`ppo.kl`): fixed, adaptive (Ziegler) or doubling (PPO)."""
    if controller == "adaptive":
        return AdaptiveKLController(init_coef, target, horizon, min_coef)
    if controller == "doubling":
        return DoublingKLController(init_coef, target, min_coef)
    if controller == "fixed":
        return FixedKLController(init_coef)
    raise ValueError(f"unknown KL controller {controller!r}: use 'fixed', 'adaptive' or "
                     "'doubling'")


def kl_controller_from_state(state: dict) -> KLController:
    """Rebuild a controller from `state_dict()` (checkpoints keep beta across a resume)."""
    kind = state.get("kind")
    if kind == "fixed":
        return FixedKLController(float(state["beta"]))
    if kind == "adaptive":
        return AdaptiveKLController(float(state["beta"]), float(state["target"]),
                                    float(state["horizon"]), float(state.get("min_beta", 0.0)))
    if kind == "doubling":
        return DoublingKLController(float(state["beta"]), float(state["target"]),
                                    float(state.get("min_beta", 0.0)))
    raise ValueError(f"unknown KL controller kind {kind!r} in checkpoint: expected 'fixed', "
                     "'adaptive' or 'doubling'")
