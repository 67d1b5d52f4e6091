"""Direct preference optimization: the policy fitted to preference pairs with no reward model
and no sampling, against a frozen reference (the SFT model).

All inputs are [N] sequence log-probabilities log pi(y | x) of the chosen (`c`) and rejected
(`r`) response of N pairs, under the policy and under the reference. With the implicit reward
r(x, y) = beta * (log pi(y | x) - log pi_ref(y | x)) and its margin h = r(x, y_c) - r(x, y_r):

- `sigmoid` (DPO; Rafailov et al. 2023, arXiv 2305.18290, eq. 7): -log sigmoid(h). With a
  preference probability mu < 1 per pair (soft labels, as the store keeps them; conservative
  DPO, Mitchell 2023), -(mu log sigmoid(h) + (1 - mu) log sigmoid(-h)).
- `ipo` (IPO; Azar et al. 2023, arXiv 2310.12036, eq. 17): (h / beta - 1 / (2 beta))^2, a
  squared loss that does not drive the margin to infinity on deterministic preferences. As
  TRL computes it, on log-probs averaged over each response's tokens (the caller passes
  those).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("sigmoid", "ipo")


def dpo_loss(policy_c: torch.Tensor, policy_r: torch.Tensor, ref_c: torch.Tensor,
             ref_r: torch.Tensor, beta: float = 0.1, loss: str = "sigmoid",
             mu: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean loss over the N pairs and {reward_accuracy (the share of pairs whose implicit
    reward ranks the chosen response first), reward_margin, reward_chosen, reward_rejected}
    (implicit rewards, beta included)."""
    if loss not in LOSSES:
        raise ValueError(f"unknown DPO loss {loss!r}: use one of {', '.join(LOSSES)}")
    if beta <= 0:
        raise ValueError(f"dpo beta={beta}: must be > 0")
    chosen = beta * (policy_c - ref_c)
    rejected = beta * (policy_r - ref_r)
    h = chosen - rejected
    if loss == "sigmoid":
        w = torch.ones_like(h) if mu is None else mu.to(h.dtype)
        per_pair = -(w * F.logsigmoid(h) + (1 - w) * F.logsigmoid(-h))
    else:
        per_pair = (h / beta - 1 / (2 * beta)) ** 2
    with torch.no_grad():
        stats = {"reward_accuracy": float((h > 0).float().mean()),
                 "reward_margin": float(h.mean()), "reward_chosen": float(chosen.mean()),
                 "reward_rejected": float(rejected.mean())}
    return per_pair.mean(), stats
