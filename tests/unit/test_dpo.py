"""DPO's and IPO's losses (core/dpo.py) on hand-derived numbers."""

import math

import pytest
import torch

from rlhf_ray.core.dpo import dpo_loss


def test_sigmoid_loss_by_hand():
    # implicit rewards: chosen 0.1 * (-1 - -2) = 0.1, rejected 0.1 * (-3 - -2) = -0.1: h = 0.2
    loss, stats = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]),
                           torch.tensor([-2.0]), beta=0.1)
    assert float(loss) == pytest.approx(-math.log(1 / (1 + math.exp(-0.2))))
    assert stats["reward_accuracy"] == 1.0 and stats["reward_margin"] == pytest.approx(0.2)
    assert stats["reward_chosen"] == pytest.approx(0.1)
    assert stats["reward_rejected"] == pytest.approx(-0.1)


def test_policy_equal_to_the_reference_gives_log_2_and_soft_labels_weigh_both_sides():
    same = torch.tensor([-1.0, -2.0])
    loss, stats = dpo_loss(same, same + 1, same, same + 1, beta=0.5)
    assert float(loss) == pytest.approx(math.log(2)) and stats["reward_accuracy"] == 0.0
    # mu = 0.5: the pair carries no preference, and the loss is symmetric in h
    a, _ = dpo_loss(torch.tensor([0.0]), torch.tensor([-1.0]), torch.zeros(1), torch.zeros(1),
                    beta=1.0, mu=torch.tensor([0.5]))
    b, _ = dpo_loss(torch.tensor([-1.0]), torch.tensor([0.0]), torch.zeros(1), torch.zeros(1),
                    beta=1.0, mu=torch.tensor([0.5]))
    assert float(a) == pytest.approx(float(b))


def test_ipo_loss_is_zero_at_its_target_margin():
    beta = 0.25  # target h / beta = 1 / (2 beta) = 2, i.e. h = 0.5
    loss, _ = dpo_loss(torch.tensor([2.0]), torch.tensor([0.0]), torch.zeros(1), torch.zeros(1),
                       beta=beta, loss="ipo")
    assert float(loss) == pytest.approx(0.0)
    loss, _ = dpo_loss(torch.tensor([0.0]), torch.tensor([0.0]), torch.zeros(1), torch.zeros(1),
                       beta=beta, loss="ipo")
    assert float(loss) == pytest.approx(4.0)  # (0 - 2)^2


def test_the_gradient_raises_the_chosen_and_lowers_the_rejected():
    pc, pr = torch.tensor([-1.0], requires_grad=True), torch.tensor([-1.0], requires_grad=True)
    loss, _ = dpo_loss(pc, pr, torch.tensor([-1.0]), torch.tensor([-1.0]), beta=0.1)
    loss.backward()
    assert pc.grad.item() < 0 < pr.grad.item()


def test_bad_settings_are_refused_in_one_line():
    with pytest.raises(ValueError, match="unknown DPO loss 'hinge'"):
        dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), loss="hinge")
    with pytest.raises(ValueError, match="dpo beta=0"):
        dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0)


@pytest.mark.parametrize("loss,lora_r", [("sigmoid", 0), ("ipo", 4)])
def test_dpo_stage_fits_the_pairs_and_writes_a_model_folder(tmp_path, loss, lora_r):
    """run_dpo on the tiny model and pairs the sentiment oracle orders: the loss falls, the
    implicit reward comes to order the pairs, and the output is a plain Hugging Face folder
    (LoRA merged)."""
    import json

    from rlhf_ray.config import load_config
    from rlhf_ray.llm import tiny
    from rlhf_ray.llm.dpo import preference_pairs, run_dpo
    from rlhf_ray.llm.modeling import load_policy

    sft = tmp_path / "sft"
    tiny.build_model(sft, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    prefs = tiny.preference_file(tmp_path / "prefs.jsonl", 96, seed=3)
    cfg = load_config("llm-tiny-smoke", [
        f"data.preferences_path={prefs}", "dpo.epochs=4", "dpo.lr=0.003", f"dpo.loss={loss}",
        "dpo.val_fraction=0.25", f"model.lora.r={lora_r}", "model.lora.alpha=8"])
    assert len(preference_pairs(cfg)) == 96
    stats = run_dpo(cfg, str(sft), str(tmp_path / "dpo"))
    assert stats["pairs"] == 72 and stats["val_pairs"] == 24
    assert stats["epochs"][-1]["loss"] < stats["epochs"][0]["loss"]
    # the implicit reward orders the training pairs, and more held-out pairs than chance
    # (0 before: the policy starts as the reference, every margin 0)
    assert stats["epochs"][-1]["reward_accuracy"] >= 0.7 > stats["epochs"][0]["reward_accuracy"]
    assert stats["val_reward_accuracy_before"] == 0 and stats["val_reward_accuracy"] > 0.5
    model = load_policy(str(tmp_path / "dpo"))  # an ordinary folder, no adapters in it
    assert not any("lora_" in k for k in model.state_dict())
    assert json.loads((tmp_path / "dpo" / "dpo_stats.json").read_text())["loss"] == loss


def test_dpo_without_pairs_says_what_to_set():
    from rlhf_ray.config import load_config
    from rlhf_ray.errors import ConfigError
    from rlhf_ray.llm.dpo import preference_pairs, run_dpo

    cfg = load_config("llm-tiny-smoke")
    assert preference_pairs(cfg) is None  # no file: the run's store is asked (the labeler)
    with pytest.raises(ValueError, match="no preference pairs: set data.preferences_path"):
        run_dpo(cfg, "unused", "unused", pairs=[])
    # nothing to ask either: refused with the config, before anything starts
    with pytest.raises(ConfigError, match="labeler.oracle: none"):
        load_config("llm-tiny-smoke", ["mode=dpo", "labeler.oracle=null",
                                       "model.reward_path=/x", "labels.per_iteration=0"])
