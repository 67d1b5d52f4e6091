"""Where each of InstructGPT's stages starts from (`llm.stages.start_points`), decided in one
place for every way a run can begin."""

from rlhf_ray.config import load_config
from rlhf_ray.llm.stages import start_points

FIT = "runs/r/reward_model"  # where stage 2 writes the reward model it fits


def test_a_fresh_run_fits_its_reward_model_and_starts_the_critic_from_it():
    s = start_points(load_config("llm-tiny-smoke"), "all", "runs/r/sft", FIT)
    assert (s.policy, s.adapter, s.reward_init) == ("runs/r/sft", None, "runs/r/sft")
    assert s.fit_reward_model and s.collect_labels
    assert s.reward_model == s.critic == FIT and s.optimizer is None
    s = start_points(load_config("llm-tiny-smoke", ["model.critic_init=policy"]), "all",
                     "runs/r/sft", FIT)
    assert s.critic == "runs/r/sft"


def test_a_given_reward_model_is_used_as_it_is():
    cfg = load_config("llm-tiny-smoke", ["model.reward_path=given/rm"])
    ppo = start_points(cfg, "ppo", "sft", FIT)
    assert not ppo.fit_reward_model and not ppo.collect_labels  # `rlhf-ray ppo`: no labeler
    assert ppo.reward_init == ppo.reward_model == ppo.critic == "given/rm"
    online = start_points(cfg, "all", "sft", FIT)
    assert online.collect_labels and not online.fit_reward_model  # labels go on meanwhile
    rm = start_points(cfg, "rm", "sft", FIT)  # `rlhf-ray rm` fits one whatever is given
    assert rm.fit_reward_model and rm.reward_init == "sft" and rm.reward_model == FIT


def test_a_resumed_run_takes_every_role_from_its_checkpoint():
    ck = "runs/r/checkpoints/iter_000004"
    s = start_points(load_config("llm-tiny-smoke", ["model.reward_path=given/rm"]), "all",
                     "runs/r/sft", FIT, ck)
    assert s.policy == f"{ck}/policy" and s.adapter is None
    assert s.reward_init == s.reward_model == f"{ck}/reward_model"
    assert s.critic == f"{ck}/critic" and s.optimizer == f"{ck}/optimizer.pt"
    assert not s.fit_reward_model and s.collect_labels
    lora = start_points(load_config("llm-tiny-smoke", ["model.lora.r=4"]), "all",
                        "runs/r/sft", FIT, ck)
    assert lora.policy == "runs/r/sft" and lora.adapter == f"{ck}/policy_adapter"
