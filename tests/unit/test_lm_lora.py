"""LoRA through peft: the reference is the base with its adapters off, generation workers
follow the learner by adapter weights alone, and a checkpoint holds both the adapters (to
resume from) and the merged policy (to use)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlhf_ray.llm import tiny
from rlhf_ray.llm.config import LoRAConfig, PPOConfig

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-lora")
    tiny.build_model(path, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    return str(path)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("top", [None, 1])
def test_lora_reference_generation_sync_and_checkpoint(tiny_path, tmp_path, top):
    from rlhf_ray.llm.generation import HFGenerationWorker
    from rlhf_ray.llm.learner import PPOLearner
    from rlhf_ray.llm.modeling import load_policy

    lora = LoRAConfig(r=4, alpha=8).model_dump()
    ppo = PPOConfig(rollout_batch_size=4, minibatch_size=4, micro_batch_size=2, ppo_epochs=2,
                      lr=5e-2).model_dump()
    gen = HFGenerationWorker(tiny_path, {"max_new_tokens": 6}, seed=0, lora=lora,
                             train_top_layers=top)
    learner = PPOLearner(0, 1, tiny_path, tiny_path, ppo, pad_id=gen.tok.pad_token_id, lora=lora,
                         train_top_layers=top)
    assert learner.ref is None  # no second copy of the model
    trainable = [n for n, p in learner.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    out = gen.generate(tiny.prompts(4, seed=1), seed=3)
    stats = learner.step({**out, "scores": np.array([1.0, -1.0, 0.5, -0.5], np.float32)}, 0.1)
    assert stats["policy_version"] == 1
    base = load_policy(tiny_path).eval()
    ids = torch.tensor([out["prompt_ids"][0] + out["response_ids"][0]])
    policy = learner.policy.eval()
    with policy.disable_adapter():
        ref = _logits(policy, ids)
    assert torch.allclose(ref, _logits(base, ids), atol=1e-6)  # the reference is the base
    trained = _logits(policy, ids)
    assert not torch.allclose(trained, ref, atol=1e-4)  # the adapters moved the policy
    version, weights = learner.policy_weights()
    assert weights and all("lora_" in k for k in weights)  # adapters only on the wire
    assert sum(v.numel() for v in weights.values()) < 0.5 * sum(p.numel() for p in base.parameters())
    assert gen.update_weights(version, weights) == 1
    assert torch.allclose(_logits(gen.model, ids), trained, atol=1e-5)
    assert gen.update_weights(version + 1, weights) == 2  # merge, unmerge, merge: no drift
    assert torch.allclose(_logits(gen.model, ids), trained, atol=1e-5)
    # checkpoint: adapters to resume from, the merged policy to use
    learner.save(str(tmp_path), tiny_path)
    merged = load_policy(str(tmp_path / "policy")).eval()
    assert torch.allclose(_logits(merged, ids), trained, atol=1e-5)
    # resumed as a run resumes: adapters, the checkpoint's critic and both optimizers' moments
    again = PPOLearner(0, 1, tiny_path, str(tmp_path / "critic"), ppo,
                       pad_id=gen.tok.pad_token_id, lora=lora,
                       adapter_path=str(tmp_path / "policy_adapter"), train_top_layers=top,
                       state_path=str(tmp_path / "optimizer.pt"))
    assert again.version == 1 and again.opt.state_dict()["state"]
    assert torch.allclose(_logits(again.policy.eval(), ids), trained, atol=1e-5)
    assert again.step({**out, "scores": np.array([1.0, -1.0, 0.5, -0.5], np.float32)},
                      0.1)["policy_version"] == 2
    resumed = HFGenerationWorker(tiny_path, {"max_new_tokens": 6}, lora=lora,
                                 adapter_path=str(tmp_path / "policy_adapter"),
                                 train_top_layers=top)
    assert torch.allclose(_logits(resumed.model, ids), trained, atol=1e-5)


def test_train_top_layers_freezes_the_rest_and_backward_stops_there(tmp_path):
    """Only the top blocks, the final norm and the heads train; the embeddings and the
    lower blocks get no gradient at all."""
    from rlhf_ray.llm.modeling import load_scalar_model, train_top_layers

    path = tmp_path / "m"
    tiny.build_model(path, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64)
    model = load_scalar_model(str(path))
    train_top_layers(model, 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".layers.2." in n or "norm" in n or "score" in n for n in trainable)
    assert any(".layers.2." in n for n in trainable) and not any("embed" in n for n in trainable)
    ids = torch.tensor([[1, 5, 6, 7, 2]])
    model(input_ids=ids).logits.sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n


@pytest.fixture(scope="module")
def tiny3_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-3-blocks")
    tiny.build_model(path, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64)
    return str(path)


def _shard(path):
    from rlhf_ray.llm.generation import HFGenerationWorker

    w = HFGenerationWorker(path, {"max_new_tokens": 6}, seed=0)
    prompts = [("the fox : " * (1 + i % 3)).strip() for i in range(6)]  # 3 prompt lengths
    out = w.generate(prompts, n=1, seed=0, logprobs=True)
    out["response_ids"] = [r[:1 + (i * 5) % 6] for i, r in enumerate(out["response_ids"])]
    out["logprobs"] = [x[:len(r)] for x, r in zip(out["logprobs"], out["response_ids"])]
    out["scores"] = np.random.default_rng(0).normal(size=6).astype(np.float32)
    return out, w.tok.pad_token_id


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8}])
def test_cached_frozen_trunk_gives_the_full_forwards_experience_gradients_and_steps(
        tiny3_path, lora, monkeypatch):
    """With the top block trained, the two frozen blocks run once per iteration and feed every
    PPO epoch (`ppo.cache_frozen_blocks`): experience, gradients and whole PPO steps equal the
    uncached ones. A trunk that does not reproduce the full forward turns the cache off."""
    from rlhf_ray.llm import experience
    from rlhf_ray.llm.learner import PPOLearner

    shard, pad = _shard(tiny3_path)
    lora = LoRAConfig(**lora).model_dump() if lora else None

    def make(cache: bool) -> PPOLearner:
        ppo = PPOConfig(rollout_batch_size=6, minibatch_size=3, micro_batch_tokens=20,
                          ppo_epochs=2, cache_frozen_blocks=cache).model_dump()
        return PPOLearner(0, 1, tiny3_path, tiny3_path, ppo, pad_id=pad, lora=lora,
                          train_top_layers=1)

    on, off = make(True), make(False)
    assert on.forward.blocks == {"policy": 2, "critic": 2}
    assert off.forward.blocks == {"policy": 0, "critic": 0}
    b = on._batch(shard)
    scores = torch.as_tensor(shard["scores"])
    e_on, e_off = on._experience(b, scores, 0.1), off._experience(b, scores, 0.1)
    assert on.forward.blocks == {"policy": 2, "critic": 2}  # the check passed: still on
    assert e_on.trunk_policy.shape[:2] == b.input_ids.shape and e_off.trunk_policy is None
    mask = b.response_mask.bool()
    for k in ("old_lp", "ref_lp", "values", "adv"):
        torch.testing.assert_close(getattr(e_on, k)[mask], getattr(e_off, k)[mask], atol=1e-5,
                                   rtol=1e-4)
    g_on, g_off = on.gradients(shard, 0.1), off.gradients(shard, 0.1)
    assert g_on.keys() == g_off.keys() and any(np.abs(g).max() > 0 for g in g_off.values())
    for k, g in g_off.items():
        np.testing.assert_allclose(g_on[k], g, rtol=1e-4, atol=1e-6, err_msg=k)
    s_on, s_off = on.step(shard, 0.1), off.step(shard, 0.1)
    for k in ("pg_loss", "vf_loss", "kl_mean"):
        assert s_on[k] == pytest.approx(s_off[k], rel=1e-3, abs=1e-6), k
    # a trunk that is not what the top blocks expect (as a model that rescales inputs_embeds)
    real = experience.trunk_states
    monkeypatch.setattr(experience, "trunk_states", lambda *a: 2.0 * real(*a))
    wrong = make(True)
    e_wrong = wrong._experience(b, scores, 0.1)
    assert wrong.forward.blocks == {"policy": 0, "critic": 0}
    for k in ("old_lp", "ref_lp", "values"):
        torch.testing.assert_close(getattr(e_wrong, k)[mask], getattr(e_off, k)[mask], atol=1e-5,
                                   rtol=1e-4)


@pytest.mark.parametrize("where", ["lora", "attention"])
def test_dropout_is_off_so_the_first_ratio_is_one(tmp_path, where):
    """With dropout in the model (LoRA's, or the attention's), old log-probs and the first
    minibatch's new ones must still be one function: approx KL 0 and nothing clipped."""
    import json

    from rlhf_ray.llm.generation import HFGenerationWorker
    from rlhf_ray.llm.learner import PPOLearner

    path = tmp_path / "tiny"
    tiny.build_model(path, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    lora = LoRAConfig(r=4, alpha=8, dropout=0.5).model_dump() if where == "lora" else None
    if where == "attention":
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**cfg, "attention_dropout": 0.5}))
    ppo = PPOConfig(rollout_batch_size=4, minibatch_size=4, micro_batch_size=4, ppo_epochs=1,
                    lr=5e-2).model_dump()
    gen = HFGenerationWorker(str(path), {"max_new_tokens": 6}, seed=0)
    out = gen.generate(tiny.prompts(4, seed=1), seed=3)
    learner = PPOLearner(0, 1, str(path), str(path), ppo, pad_id=gen.tok.pad_token_id, lora=lora)
    if where == "lora":  # fresh adapters have B = 0; move them so their dropout matters
        with torch.no_grad():
            for n, p in learner.policy.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
    stats = learner.step({**out, "scores": np.array([1.0, -1.0, 0.5, -0.5], np.float32)}, 0.1)
    assert stats["approx_kl"] == 0.0 and stats["clipfrac"] == 0.0, stats


def test_learning_rate_warms_up_and_decays_over_the_runs_iterations(tiny_path):
    from rlhf_ray.llm.generation import HFGenerationWorker
    from rlhf_ray.llm.learner import PPOLearner

    ppo = PPOConfig(rollout_batch_size=4, minibatch_size=4, micro_batch_size=4, ppo_epochs=1,
                    lr=1e-3, critic_lr=1e-2, lr_schedule="linear",
                    lr_warmup_iterations=2).model_dump()
    gen = HFGenerationWorker(tiny_path, {"max_new_tokens": 4}, seed=0)
    out = gen.generate(tiny.prompts(4, seed=1), seed=3)
    learner = PPOLearner(0, 1, tiny_path, tiny_path, ppo, pad_id=gen.tok.pad_token_id,
                         iterations=4)
    shard = {**out, "scores": np.array([1.0, -1.0, 0.5, -0.5], np.float32)}
    got = [learner.step(shard, 0.1)["lr"] for _ in range(4)]
    assert got == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])  # warm-up 2, then 1 - (v - 2) / 2
    assert learner.critic_opt.param_groups[0]["lr"] == pytest.approx(5e-3)


def test_a_critic_from_the_reward_model_predicts_normalized_scores(tiny_path, tmp_path):
    """The critic starts as the reward model (raw scores) but PPO's returns are normalized,
    (raw - mean) / std: folding that into its head moves its values exactly so, and a
    checkpoint keeps the offset (a Llama score head has no bias)."""
    from rlhf_ray.llm.generation import HFGenerationWorker
    from rlhf_ray.llm.learner import PPOLearner
    from rlhf_ray.llm.modeling import make_batch, response_values

    ppo = PPOConfig(rollout_batch_size=4, minibatch_size=4, micro_batch_size=4).model_dump()
    gen = HFGenerationWorker(tiny_path, {"max_new_tokens": 4}, seed=0)
    out = gen.generate(tiny.prompts(4, seed=1), seed=3)
    pad = gen.tok.pad_token_id
    learner = PPOLearner(0, 1, tiny_path, tiny_path, ppo, pad_id=pad)
    b = make_batch(out["prompt_ids"], out["response_ids"], pad)

    def values(critic):
        with torch.no_grad():
            return response_values(critic, b.input_ids, b.attention_mask, b.position_ids,
                                   b.prompt_len)

    raw = values(learner.critic)
    learner.fold_reward_normalization(mean=2.0, std=4.0)
    assert torch.allclose(values(learner.critic), (raw - 2.0) / 4.0, atol=1e-5)
    learner.save(str(tmp_path), tiny_path)
    again = PPOLearner(0, 1, tiny_path, str(tmp_path / "critic"), ppo, pad_id=pad)
    assert torch.allclose(values(again.critic), (raw - 2.0) / 4.0, atol=1e-5)


def test_ppo_ptx_adds_gamma_times_the_pretraining_nll_gradient(tiny_path):
    """PPO-ptx (InstructGPT): the minibatch's gradient is PPO's plus ptx_coef times the
    gradient of the pretraining text's mean token NLL; and the held-out text's NLL is the
    model's own language-model loss, whatever the padding beside it."""
    from rlhf_ray.llm.generation import HFGenerationWorker
    from rlhf_ray.llm.learner import PPOLearner
    from rlhf_ray.llm.modeling import load_policy

    gen = HFGenerationWorker(tiny_path, {"max_new_tokens": 4}, seed=0)
    tok, pad = gen.tok, gen.tok.pad_token_id
    text = tok("the quick brown fox jumps over the lazy dog")["input_ids"]
    short = tok("a fox")["input_ids"]
    out = gen.generate(tiny.prompts(4, seed=1), seed=3)
    shard = {**out, "scores": np.array([1.0, -1.0, 0.5, -0.5], np.float32)}
    base = dict(rollout_batch_size=4, minibatch_size=4, micro_batch_size=4, ppo_epochs=1)
    plain = PPOLearner(0, 1, tiny_path, tiny_path, PPOConfig(**base).model_dump(), pad_id=pad)
    ptx = PPOLearner(0, 1, tiny_path, tiny_path, PPOConfig(**base, ptx_coef=2.5).model_dump(),
                     pad_id=pad, ptx_ids=[text])  # one text: every sampled row is it
    g0, g1 = plain.gradients(shard, 0.1), ptx.gradients(shard, 0.1)
    model = load_policy(tiny_path, "float32", "cpu")
    ids = torch.tensor([text])
    model(input_ids=ids, labels=ids).loss.backward()  # the mean token NLL, HF's own
    for name, p in model.named_parameters():
        diff = g1["policy." + name] - g0["policy." + name]
        assert np.allclose(diff, 2.5 * p.grad.numpy(), atol=1e-5), name
    assert all(np.array_equal(g1[k], g0[k]) for k in g0 if k.startswith("critic."))
    with torch.no_grad():
        want = [float(model(input_ids=torch.tensor([r]), labels=torch.tensor([r])).loss)
                * (len(r) - 1) for r in (text, short)]
    nll, n = ptx.text_nll([text, short])  # one padded batch
    assert n == len(text) + len(short) - 2 and nll == pytest.approx(sum(want), rel=1e-5)
    assert ptx.step(shard, 0.1)["ptx_loss"] == pytest.approx(want[0] / (len(text) - 1),
                                                             rel=1e-4)
