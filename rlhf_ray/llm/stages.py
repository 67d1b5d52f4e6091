"""Where each of InstructGPT's three stages starts from in a run: decided once, here, from the
stages asked for, a checkpoint to resume from, the files the config gives and LoRA.

  fresh:    SFT -> a reward model fitted to rankings of SFT samples -> PPO from the SFT model
  given:    `model.reward_path` (not resumed, not `rm`): PPO against that reward model
  resumed:  every role from the checkpoint (policy or its LoRA adapters, critic, optimizer
            moments, reward model); the labels from the store
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_ray.llm.config import LLMConfig
from rlhf_ray.storage import locations


@dataclass(frozen=True)
class StartPoints:
    policy: str  # the generation workers' and the learners' policy (the SFT model with LoRA)
    adapter: str | None  # LoRA: a checkpoint's adapters on the SFT model
    reward_init: str  # the reward trainer's starting weights
    fit_reward_model: bool  # stage 2 fits the first reward model (else resumed or given)
    collect_labels: bool  # a labeler asks people or the oracle for rankings
    reward_model: str  # the reward model PPO scores with (stage 2's output where it fits one)
    critic: str
    optimizer: str | None  # the learners' optimizer moments (a checkpoint's)


def start_points(cfg: LLMConfig, stages: str, sft_path: str, fitted: str,
                 ckpt: str | None = None) -> StartPoints:
    """`sft_path`: stage 1's model; `fitted`: where stage 2 writes a reward model it fits;
    `ckpt`: a checkpoint of the online loop to resume."""
    lora = cfg.model.lora.r > 0
    if ckpt is not None:  # every role from the checkpoint; with LoRA, adapters on the SFT model
        rm = locations.join(ckpt, "reward_model")
        return StartPoints(
            policy=sft_path if lora else locations.join(ckpt, "policy"),
            adapter=locations.join(ckpt, "policy_adapter") if lora else None,
            reward_init=rm, fit_reward_model=False, collect_labels=True, reward_model=rm,
            critic=locations.join(ckpt, "critic"),
            optimizer=locations.join(ckpt, "optimizer.pt"))
    given = bool(cfg.model.reward_path) and stages != "rm"
    rm = cfg.model.reward_path if given else fitted
    return StartPoints(
        policy=sft_path, adapter=None, reward_init=rm if given else sft_path,
        fit_reward_model=not given, collect_labels=not given or stages == "all",
        reward_model=rm, critic=rm if cfg.model.critic_init == "reward_model" else sft_path,
        optimizer=None)
