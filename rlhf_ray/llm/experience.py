"""Experience making for PPO on language models (OpenRLHF's `experience_maker`): for one
rollout batch, the sampling policy's and the frozen reference's token log-probs, the
critic's values, the KL-penalized token rewards (InstructGPT eq. 2, Ziegler et al. 2019) and
GAE advantages, whitened with the moments of the whole batch across learner ranks.

How the models are run is a strategy (`Forward`): every block in every pass, or
`CachedTrunk`, which runs the frozen blocks below the trained ones once per iteration (here)
and feeds their output to the top blocks in every PPO epoch (`model.train_top_layers` with
`ppo.cache_frozen_blocks`), checking once per learner that the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from rlhf_ray.core import advantages, lm_ppo
from rlhf_ray.llm.modeling import (
    TokenBatch,
    decoder_layers,
    only_blocks,
    response_logprobs,
    response_values,
    trunk_states,
)

ROLES = ("policy", "critic")


def unwrap(model):
    """The model inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


class Forward:
    """The policy's (or, adapters off, the reference's) response log-probs and the critic's
    values on a micro batch, every block run in every pass."""

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature
        self.blocks = {role: 0 for role in ROLES}  # frozen blocks cached per role (none)

    def trunks(self, policy, critic, m: TokenBatch) -> dict[str, torch.Tensor | None]:
        """The output of each role's cached frozen blocks on `m` ([B, P + T, H]; None: not
        cached)."""
        return {role: None for role in ROLES}

    def check(self, policy, critic, m: TokenBatch, trunks: dict) -> None:
        """Once per learner, before the first use of a cache: nothing to check here."""

    def logprobs(self, model, m: TokenBatch, trunk: torch.Tensor | None = None,
                 with_entropy: bool = False):
        return response_logprobs(model, m.input_ids, m.attention_mask, m.position_ids,
                                 m.prompt_len, self.temperature, with_entropy)

    def values(self, critic, m: TokenBatch, trunk: torch.Tensor | None = None) -> torch.Tensor:
        """`critic`: the DDP-wrapped one to train, the bare one for experience (whose passes
        need no collectives)."""
        return response_values(critic, m.input_ids, m.attention_mask, m.position_ids,
                               m.prompt_len)


class CachedTrunk(Forward):
    """The frozen trunk: each role's blocks below its trained ones run once per iteration,
    and the trained blocks are fed their cached output in every epoch (`blocks`: how many
    per role). A model family that transforms `inputs_embeds` (as Gemma scales them) would
    differ: `check` compares the two once and turns the cache off for a role, saying so."""

    def __init__(self, temperature: float, blocks: dict[str, int], rank: int = 0):
        super().__init__(temperature)
        self.blocks = dict(blocks)
        self.rank = rank
        self.checked = False

    @classmethod
    def for_models(cls, policy, critic, top: int, temperature: float, rank: int = 0):
        """The cache for models that train their top `top` blocks."""
        return cls(temperature, {role: 0 if model is None else
                                 max(0, len(decoder_layers(model)[1]) - top)
                                 for role, model in (("policy", policy), ("critic", critic))},
                   rank)

    def trunks(self, policy, critic, m):
        args = (m.input_ids, m.attention_mask, m.position_ids)
        return {role: trunk_states(model, self.blocks[role], *args) if self.blocks[role] else None
                for role, model in (("policy", policy), ("critic", critic))}

    def logprobs(self, model, m, trunk=None, with_entropy=False):
        if trunk is None:
            return super().logprobs(model, m, None, with_entropy)
        with only_blocks(unwrap(model), slice(self.blocks["policy"], None)):
            return response_logprobs(model, m.input_ids, m.attention_mask, m.position_ids,
                                     m.prompt_len, self.temperature, with_entropy,
                                     inputs_embeds=trunk)

    def values(self, critic, m, trunk=None):
        if trunk is None:
            return super().values(critic, m)
        with only_blocks(unwrap(critic), slice(self.blocks["critic"], None)):
            return response_values(critic, m.input_ids, m.attention_mask, m.position_ids,
                                   m.prompt_len, inputs_embeds=trunk)

    def check(self, policy, critic, m, trunks):
        """The top blocks fed the cached trunk must give the full forward's log-probs and
        values (dropout off, so the two passes compare)."""
        if self.checked:
            return
        self.checked = True
        modes = [(mod, mod.training) for mod in (policy, critic) if mod is not None]
        for mod, _ in modes:
            mod.eval()
        try:
            self._compare(policy, critic, m, trunks)
        finally:
            for mod, training in modes:
                mod.train(training)

    def _compare(self, policy, critic, m, trunks) -> None:
        tol = 1e-3 if m.input_ids.device.type == "cpu" and next(
            policy.parameters()).dtype == torch.float32 else 5e-2
        checks = {}
        if trunks["policy"] is not None:
            checks["policy"] = (self.logprobs(policy, m, None),
                                self.logprobs(policy, m, trunks["policy"]))
        if trunks["critic"] is not None:
            checks["critic"] = (self.values(critic, m, None),
                                self.values(critic, m, trunks["critic"]))
        for role, (full, cached) in checks.items():
            err = float((full.float() - cached.float()).abs().max())
            if not err <= tol:
                print(f"[learner {self.rank}] ppo.cache_frozen_blocks off for the {role}: "
                      f"its top blocks from the cached trunk differ from its full forward by "
                      f"{err:.2g}", flush=True)
                self.blocks[role] = 0
                trunks[role] = None


@dataclass
class Experience:
    """One rollout batch made ready for PPO epochs; every tensor [B, T] over response tokens
    (0 on padding) but the trunks, [B, P + T, H] or None."""

    old_lp: torch.Tensor
    ref_lp: torch.Tensor
    values: torch.Tensor
    adv: torch.Tensor
    returns: torch.Tensor
    kl: torch.Tensor
    rewards: torch.Tensor
    trunk_policy: torch.Tensor | None = None
    trunk_critic: torch.Tensor | None = None
    is_weights: torch.Tensor | None = None  # the sampler correction's, [B, T] (or None)
    sampler_stats: dict | None = None  # sampler_kl, ... (where the sampler's log-probs came)

    def trunk(self, role: str) -> torch.Tensor | None:
        return self.trunk_policy if role == "policy" else self.trunk_critic


@torch.no_grad()
def make_experience(forward: Forward, policy, critic, ref, b: TokenBatch, scores: torch.Tensor,
                    beta: float, ppo, micro_batches: Callable[[np.ndarray], list[np.ndarray]],
                    sampler_logprobs: list[list[float]] | None = None,
                    allreduce: Callable[..., list[float]] | None = None,
                    needs_ref: bool = True) -> Experience:
    """Old and reference log-probs, values, KL-penalized rewards, GAE for batch `b`.

    policy, critic: the bare models (no DDP: these passes need no collectives); critic None:
    a critic-free estimator (`ppo.advantage_estimator`), whose `scores` come shaped by their
    group baseline (`advantages.shape_scores`). ref: the frozen reference, or None where it
    is the policy with its LoRA adapters off; `needs_ref` False: no reference at all (beta
    fixed at 0: its log-probs are the old ones, the KL 0). `ppo`: the
    `ppo` section (KL estimator, gamma, lambda, whitening, old log-probs, sampler
    correction). `sampler_logprobs`: the sampling policy's per-token log-probs from
    generation: PPO's old log-probs with `ppo.old_logprobs=generation` (one forward pass
    fewer), else compared with the learner's own (`lm_ppo.sampler_correction`).
    `allreduce`: sums floats over the learner ranks (the whitening's moments)."""
    shape = b.response_mask.shape
    device = b.input_ids.device
    old_lp, ref_lp, values = (torch.zeros(shape, device=device) for _ in range(3))
    sampler_lp = None
    if sampler_logprobs is not None:
        sampler_lp = torch.zeros(shape, device=device)
        for i, x in enumerate(sampler_logprobs):
            sampler_lp[i, :min(len(x), shape[1])] = torch.as_tensor(x[:shape[1]])
    given = sampler_lp is not None and ppo.old_logprobs == "generation"
    if given:
        old_lp = sampler_lp
    caches: dict[str, torch.Tensor | None] = {role: None for role in ROLES}
    for idx in micro_batches(np.arange(len(b))):
        sub = b.select(idx)
        m, cols = sub.trimmed(), sub.kept_columns()
        t = m.response_mask.shape[1]
        trunks = forward.trunks(policy, critic, m)
        forward.check(policy, critic, m, trunks)
        for role, h in trunks.items():
            if h is not None:
                if caches[role] is None:
                    caches[role] = h.new_zeros((len(b), b.input_ids.shape[1], h.shape[-1]))
                caches[role][torch.as_tensor(idx)[:, None],
                             torch.arange(cols.start, cols.stop)[None, :]] = h
        if not given:
            old_lp[idx, :t] = forward.logprobs(policy, m, trunks["policy"])
        if needs_ref and ref is None:  # LoRA: the reference is the base, adapters off
            with policy.disable_adapter():
                ref_lp[idx, :t] = forward.logprobs(policy, m, trunks["policy"])
        elif needs_ref:  # its own blocks throughout (a second copy; the trunk is the policy's)
            ref_lp[idx, :t] = response_logprobs(ref, m.input_ids, m.attention_mask,
                                                m.position_ids, m.prompt_len,
                                                forward.temperature)
        if critic is not None:
            values[idx, :t] = forward.values(critic, m, trunks["critic"]).float()
    mask = b.response_mask
    if not needs_ref:  # the old log-probs stand in: the KL is 0
        ref_lp = old_lp
    is_weights, sampler_stats = None, None
    if sampler_lp is not None and not given:
        is_weights, sampler_stats = lm_ppo.sampler_correction(old_lp, sampler_lp, mask,
                                                              ppo.importance_sampling_cap)
    kl = lm_ppo.kl_estimate(old_lp, ref_lp, ppo.kl.estimator) * mask
    # the KL in the reward, or (placement=loss) in the policy loss instead
    kl_in_reward = kl if ppo.kl.placement == "reward" else torch.zeros_like(kl)
    rewards = lm_ppo.token_rewards(scores, kl_in_reward, beta, mask)
    if critic is None:  # the score already less its baseline; the KL penalty per token
        adv, returns = advantages.token_advantages(
            ppo.advantage_estimator, scores, -beta * kl_in_reward, mask, ppo.gamma, allreduce)
    else:
        adv, returns = lm_ppo.gae(rewards, values, mask, ppo.gamma, ppo.lam)
        if ppo.whiten_advantages:
            adv = lm_ppo.masked_whiten(adv, mask, allreduce=allreduce)
    return Experience(old_lp, ref_lp, values, adv, returns, kl, rewards,
                      caches["policy"], caches["critic"], is_weights, sampler_stats)
