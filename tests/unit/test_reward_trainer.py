"""The ensemble learns a reward from comparisons alone (no Ray)."""

import numpy as np
import pytest
import torch

from rlhf_ray.config import RewardModelConfig
from rlhf_ray.reward_model import RewardEnsemble, RewardNetSpec, as_tensors, load_weights, save_weights
from rlhf_ray.reward_trainer import Comparisons, RewardTrainer


def make_comparisons(n, k=8, rng=None):
    """True reward r(o, a) = o[0] - |a|; labels by the larger true return."""
    rng = rng or np.random.default_rng(0)
    obs = rng.normal(size=(2, n, k, 4)).astype(np.float32)
    act = rng.normal(size=(2, n, k, 1)).astype(np.float32)
    ret = (obs[..., 0] - np.abs(act[..., 0])).sum(-1)
    mu = (ret[0] > ret[1]).astype(np.float32)
    return Comparisons(obs[0], act[0], obs[1], act[1], mu), (obs, act)


def spec(**kw):
    return RewardNetSpec(net="mlp", obs_shape=(4,), act_dim=1, hidden=(32, 32), **kw)


def test_ensemble_learns_preferences_and_generalizes():
    trainer = RewardTrainer(spec(ensemble_size=3), RewardModelConfig(lr=3e-3, batch_size=32), seed=0)
    data, _ = make_comparisons(300)
    trainer.add(data)
    for _ in range(4):
        stats = trainer.train(steps=100)
    assert stats["rm_version"] == 4
    assert stats["rm_val_accuracy"] > 0.8  # held-out comparisons of each member
    test, _ = make_comparisons(200, rng=np.random.default_rng(99))
    ens = trainer.ensemble
    k = test.left_obs.shape[1]
    r1 = ens.member_rewards(*as_tensors(test.left_obs.reshape(-1, 4), test.left_act.reshape(-1, 1))).mean(0)
    r2 = ens.member_rewards(*as_tensors(test.right_obs.reshape(-1, 4), test.right_act.reshape(-1, 1))).mean(0)
    pred_left = r1.reshape(-1, k).sum(1) > r2.reshape(-1, k).sum(1)
    assert (pred_left.numpy() == (test.mu > 0.5)).mean() > 0.85


def test_bootstrap_holds_out_about_one_over_e():
    trainer = RewardTrainer(spec(ensemble_size=4), RewardModelConfig(), seed=1)
    trainer.add(make_comparisons(3000)[0])
    held_out = (trainer._counts == 0).mean()
    assert abs(held_out - np.exp(-1)) < 0.02
    # members see different bootstraps
    assert not np.array_equal(trainer._counts[0], trainer._counts[1])


def test_outputs_are_normalized_per_member():
    trainer = RewardTrainer(spec(ensemble_size=2, output_std=0.05), RewardModelConfig(), seed=0)
    data, (obs, act) = make_comparisons(200)
    trainer.add(data)
    trainer.train(steps=20)
    r = trainer.ensemble.member_rewards(*as_tensors(np.concatenate([obs[0], obs[1]]).reshape(-1, 4),
                                                    np.concatenate([act[0], act[1]]).reshape(-1, 1)))
    assert torch.allclose(r.mean(1), torch.zeros(2), atol=0.01)
    assert torch.allclose(r.std(1), torch.full((2,), 0.05), rtol=0.05)


def test_skips_are_not_trained_on():
    trainer = RewardTrainer(spec(), RewardModelConfig(), seed=0)
    data, _ = make_comparisons(10)
    data.mu[:4] = np.nan
    assert trainer.add(data) == 6


def test_l2_adapts_when_overfitting():
    cfg = RewardModelConfig(lr=1e-2, l2=1e-4, batch_size=8)
    trainer = RewardTrainer(spec(ensemble_size=1), cfg, seed=0)
    trainer.add(make_comparisons(20)[0])  # tiny data: a 32x32 MLP overfits it
    for _ in range(5):
        stats = trainer.train(steps=100)
    assert stats["rm_l2_mean"] > 1e-4


def test_weights_round_trip_through_safetensors(tmp_path):
    trainer = RewardTrainer(spec(), RewardModelConfig(), seed=0)
    trainer.add(make_comparisons(50)[0])
    trainer.train(steps=5)
    version, weights = trainer.weights()
    path = str(tmp_path / "rm.safetensors")
    save_weights(path, {k: torch.as_tensor(v) for k, v in weights.items()}, trainer.spec, version)
    state, spec2, v2 = load_weights(path)
    ens = RewardEnsemble(spec2)
    ens.load_flat_state(state)
    x = torch.randn(7, 4), torch.randn(7, 1)
    assert v2 == version and torch.allclose(ens.member_rewards(*x), trainer.ensemble.member_rewards(*x))


def test_cnn_member_scores_frames():
    s = RewardNetSpec(net="cnn", obs_shape=(84, 84, 4), act_dim=6, discrete=True, ensemble_size=2)
    ens = RewardEnsemble(s)
    out = ens.member_rewards(torch.randint(0, 255, (5, 84, 84, 4), dtype=torch.uint8), torch.zeros(5))
    assert out.shape == (2, 5)
    with pytest.raises(ValueError, match="unknown reward net"):
        RewardEnsemble(RewardNetSpec(net="rnn", obs_shape=(3,), act_dim=1))
