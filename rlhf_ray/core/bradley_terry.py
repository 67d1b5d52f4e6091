"""Bradley-Terry preference loss with the paper's random-response model, and adaptive L2.

Christiano et al. 2017, section 2.2.3, eq. (1):
    P[s1 > s2] = exp(sum r(s1)) / (exp(sum r(s1)) + exp(sum r(s2))) = sigmoid(R1 - R2)
and "we assume there is a 10% chance that the human responds uniformly at random":
    P' = (1 - eps) * P + eps / 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def preference_prob(returns_left: torch.Tensor, returns_right: torch.Tensor,
                    random_response_prob: float = 0.0) -> torch.Tensor:
    """P'(left > right) under Bradley-Terry plus uniform random responses.

    returns_*: [...] summed predicted rewards of each segment. Returns [...] in
    [eps/2, 1 - eps/2].
    """
    p = torch.sigmoid(returns_left - returns_right)
    return (1.0 - random_response_prob) * p + 0.5 * random_response_prob


def bradley_terry_loss(returns_left: torch.Tensor, returns_right: torch.Tensor,
                       mu_left: torch.Tensor, random_response_prob: float = 0.1,
                       reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy between the label distribution mu and P' (the paper's loss).

    returns_left, returns_right, mu_left: [B]. mu_left is 1 (left better), 0 (right
    better) or 0.5 (equal). Computed in log space so it stays finite for large margins.
    """
    delta = returns_left - returns_right
    eps = random_response_prob
    if eps == 0.0:
        log_p_left = F.logsigmoid(delta)
        log_p_right = F.logsigmoid(-delta)
    else:
        # log((1-eps) * sigmoid(d) + eps/2), stably: logaddexp of the two terms.
        log_keep = torch.log1p(torch.tensor(-eps, dtype=delta.dtype))
        log_half_eps = torch.log(torch.tensor(eps / 2, dtype=delta.dtype))
        log_p_left = torch.logaddexp(log_keep + F.logsigmoid(delta), log_half_eps)
        log_p_right = torch.logaddexp(log_keep + F.logsigmoid(-delta), log_half_eps)
    loss = -(mu_left * log_p_left + (1.0 - mu_left) * log_p_right)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def adapt_l2(l2: float, train_loss: float, val_loss: float,
             low: float = 1.1, high: float = 1.5, factor: float = 1.5,
             min_l2: float = 1e-6, max_l2: float = 10.0) -> float:
    """The paper's rule: keep validation loss between `low` and `high` times training loss.

    Overfitting (val > high * train) strengthens L2; underfitting (val < low * train)
    weakens it. Returns the new coefficient, clipped to [min_l2, max_l2].
    """
    if train_loss <= 0:
        return l2
    ratio = val_loss / train_loss
    if ratio > high:
        l2 *= factor
    elif ratio < low:
        l2 /= factor
    return float(min(max(l2, min_l2), max_l2))


def ranking_loss(rewards: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """InstructGPT's reward-model loss for rankings (Ouyang et al. 2022, eq. 1).

    rewards: [B, K] scalar rewards r(x, y_k) of K responses to each of B prompts; order:
    [B, K] response indices, best first. Every one of the C(K, 2) pairs of a prompt is a
    comparison (y_w ranked above y_l); a prompt's loss is
        -1/C(K,2) * sum over pairs of log sigmoid(r(x, y_w) - r(x, y_l)),
    so a prompt weighs the same whatever its K (the paper's guard against overfitting to
    one prompt's many pairs). Returns the mean over prompts; K = 2 is the plain pair loss.
    """
    b, k = rewards.shape
    if k < 2:
        raise ValueError(f"a ranking needs at least 2 responses, got K={k}")
    ranked = torch.gather(rewards, 1, order.long())  # [B, K], best first
    w, l = torch.triu_indices(k, k, offset=1, device=rewards.device)  # all i < j: i ranked higher
    pair_losses = -F.logsigmoid(ranked[:, w] - ranked[:, l])  # [B, C(K,2)]
    return pair_losses.mean(dim=1).mean()


def grouped_preference_loss(rewards: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                            mu: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """`ranking_loss` for labels as the store keeps them: pairwise comparisons, each tagged
    with the prompt (ranking) it came from, possibly with ties and partial rankings.

    rewards: [N] scores of the distinct responses (each response scored once, however many
    pairs it is in: InstructGPT's single forward pass per ranking); left, right: [M] indices
    into rewards; mu: [M] probability that left is preferred (1, 0, or 0.5 for `equal`);
    group: [M] group index 0..G-1. A group's loss is the mean Bradley-Terry cross-entropy of
    its pairs (the 1/C(K,2) normalization); the result is the mean over groups.
    """
    d = rewards[left] - rewards[right]
    ce = -(mu * F.logsigmoid(d) + (1.0 - mu) * F.logsigmoid(-d))
    g = int(group.max()) + 1 if len(group) else 0
    sums = torch.zeros(g, dtype=ce.dtype, device=ce.device).index_add(0, group, ce)
    counts = torch.zeros(g, dtype=ce.dtype, device=ce.device).index_add(
        0, group, torch.ones_like(ce))
    present = counts > 0
    return (sums[present] / counts[present]).mean()
