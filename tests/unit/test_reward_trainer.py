"""The ensemble learns a reward from comparisons alone (no Ray)."""

import numpy as np
import pytest
import torch

from rlhf_ray.control.config import RewardModelConfig
from rlhf_ray.control.reward import (
    RewardEnsemble,
    RewardNetSpec,
    as_tensors,
    load_weights,
    save_weights,
)
from rlhf_ray.control.reward_trainer import RewardTrainer
from rlhf_ray.core.comparisons import Comparisons


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


def test_validation_and_the_l2_rule_see_every_label_not_the_oldest():
    """Past 1,024 held-out comparisons a member's validation accuracy and loss are still over
    all of them: the newest labels here contradict the oldest, so an estimate from the first
    rows alone would be far off."""
    trainer = RewardTrainer(spec(ensemble_size=2), RewardModelConfig(lr=3e-3, batch_size=32), seed=0)
    data, _ = make_comparisons(4000)
    data.mu[2500:] = 1.0 - data.mu[2500:]  # later labels disagree with the earlier ones
    trainer.add(data)
    stats = trainer.train(steps=50)
    accs = []
    for k in range(2):
        val = np.flatnonzero(trainer._counts[k] == 0)
        assert len(val) > 1024
        ens = trainer.ensemble
        ret = [ens.raw_member(k, *as_tensors(o[val].reshape(-1, 4), a[val].reshape(-1, 1)))
               .reshape(len(val), -1).sum(1).detach().numpy()
               for o, a in ((data.left_obs, data.left_act), (data.right_obs, data.right_act))]
        accs.append(((ret[0] > ret[1]) == (data.mu[val] > 0.5)).mean())
        first = val[:1024]
        assert abs(((ret[0] > ret[1])[:1024] == (data.mu[first] > 0.5)).mean() - accs[-1]) > 0.1
    assert stats["rm_val_accuracy"] == pytest.approx(np.mean(accs), abs=1e-6)


def test_label_buffer_trains_on_the_most_recent_labels_only():
    """The paper's Atari buffer (`reward_model.label_buffer`): with the old labels reversed,
    a member trained on the recent ones alone learns the recent preference."""
    data, _ = make_comparisons(1200)
    data.mu[:800] = 1.0 - data.mu[:800]  # the first 800 labels say the opposite
    accs = {}
    for buffer in (None, 400):
        trainer = RewardTrainer(spec(ensemble_size=1), RewardModelConfig(
            lr=3e-3, batch_size=32, label_buffer=buffer), seed=0)
        trainer.add(data)
        stats = trainer.train(steps=300)
        assert stats["rm_labels_in_buffer"] == (buffer or 1200)
        test, _ = make_comparisons(300, rng=np.random.default_rng(5))
        r = [trainer.ensemble.member_rewards(*as_tensors(o.reshape(-1, 4), a.reshape(-1, 1)))[0]
             .reshape(300, -1).sum(1).numpy()
             for o, a in ((test.left_obs, test.left_act), (test.right_obs, test.right_act))]
        accs[buffer] = ((r[0] > r[1]) == (test.mu > 0.5)).mean()  # the recent preference
    assert accs[400] > 0.8 > 0.5 > accs[None]


def test_batch_norm_cnn_member_trains_and_serves_in_eval_mode():
    cnn = RewardNetSpec(net="cnn", obs_shape=(84, 84, 4), act_dim=6, discrete=True,
                        ensemble_size=1, dropout=0.5, batch_norm=True)
    trainer = RewardTrainer(cnn, RewardModelConfig(batch_size=4), seed=0)
    rng = np.random.default_rng(0)
    obs = rng.integers(0, 255, size=(2, 8, 3, 84, 84, 4), dtype=np.uint8)
    act = np.zeros((2, 8, 3, 6), dtype=np.float32)
    trainer.add(Comparisons(obs[0], act[0], obs[1], act[1], np.ones(8, dtype=np.float32)))
    stats = trainer.train(steps=3)
    assert np.isfinite(stats["rm_train_loss"])
    state = trainer.ensemble.flat_state()
    assert any(k.endswith("running_mean") for k in state)  # batch norm's statistics travel
    served = RewardEnsemble(RewardNetSpec.from_json(cnn.to_json())).eval()
    served.load_flat_state(state)
    o, a = as_tensors(obs[0, :2].reshape(-1, 84, 84, 4), act[0, :2].reshape(-1, 6))
    torch.testing.assert_close(served.member_rewards(o, a), trainer.ensemble.member_rewards(o, a))


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


def test_input_normalizer_standardizes_and_a_refit_keeps_the_function():
    ens = RewardEnsemble(spec(ensemble_size=2))
    rng = np.random.default_rng(0)
    # features on very different scales, as MuJoCo's angles and joint velocities are
    obs = torch.from_numpy((rng.normal(size=(500, 4)) * [0.1, 10.0, 1.0, 3.0] + [0, 5, 0, -2])
                           .astype(np.float32))
    act = torch.from_numpy(rng.uniform(-1, 1, size=(500, 1)).astype(np.float32))
    assert ens.fit_input_normalizer(obs, act, preserve=False)
    m = ens.members[0]
    z = (m.raw_inputs(obs, act) - m.in_mean) / m.in_std
    assert torch.allclose(z.mean(0), torch.zeros(5), atol=1e-4)
    assert torch.allclose(z.std(0), torch.ones(5), atol=1e-3)
    before = torch.stack([mem(obs, act) for mem in ens.members])
    old_std = m.in_std.clone()
    # new data with other statistics: the refit moves the normalizer, not the predictions
    assert ens.fit_input_normalizer(obs * 3 + 1, act * 0.5, preserve=True)
    after = torch.stack([mem(obs, act) for mem in ens.members])
    assert torch.allclose(m.in_std[:4], old_std[:4] * 3, rtol=1e-3)  # it did move
    assert torch.allclose(before, after, atol=1e-4)
    # a feature that has not moved yet (a contact flag) is centred, not blown up
    still = torch.cat([obs[:, :3], torch.full((500, 1), 0.5)], dim=1)
    ens.fit_input_normalizer(still, act, preserve=True)
    assert float(m.in_std[3]) == 1.0 and float(m.in_mean[3]) == pytest.approx(0.5)


def test_one_hot_actions_are_not_standardized():
    s = RewardNetSpec(net="mlp", obs_shape=(3,), act_dim=4, discrete=True, hidden=(8,))
    ens = RewardEnsemble(s)
    obs = torch.randn(200, 3) * 5
    act = torch.zeros(200, dtype=torch.long)  # action 0 only, so far
    ens.fit_input_normalizer(obs, act, preserve=False)
    m = ens.members[0]
    assert torch.equal(m.in_mean[3:], torch.zeros(4)) and torch.equal(m.in_std[3:], torch.ones(4))
    assert float(m.in_std[0]) > 2.0


def test_trainer_fits_input_normalizer_only_when_configured():
    data, _ = make_comparisons(100)
    data.left_obs[..., 1] *= 50.0  # one feature far larger than the others
    on = RewardTrainer(spec(), RewardModelConfig(), seed=0)
    off = RewardTrainer(spec(), RewardModelConfig(normalize_inputs=False), seed=0)
    for t in (on, off):
        t.add(data)
        t.train(steps=5)
    assert float(on.ensemble.members[0].in_std[1]) > 10.0
    assert torch.equal(off.ensemble.members[0].in_std, torch.ones(5))


def test_weights_saved_before_input_normalization_still_load():
    ens = RewardEnsemble(spec())
    old = {k: v for k, v in ens.flat_state().items() if not k.endswith(("in_mean", "in_std"))}
    ens2 = RewardEnsemble(spec(), seed=5)
    ens2.fit_input_normalizer(torch.randn(50, 4) * 7, torch.randn(50, 1), preserve=False)
    ens2.load_flat_state(old)
    x = torch.randn(7, 4), torch.randn(7, 1)
    assert torch.allclose(ens2.member_rewards(*x), ens.member_rewards(*x))


def test_a_round_that_runs_alone_takes_the_threads_it_is_given(monkeypatch):
    trainer = RewardTrainer(spec(), RewardModelConfig(), seed=0)
    trainer.add(make_comparisons(40)[0])
    before, seen = torch.get_num_threads(), []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real(n)))
    v = trainer.version
    trainer.train(steps=2, threads=3)  # the pretraining: nothing else runs
    assert seen == [3, before] and torch.get_num_threads() == before and trainer.version == v + 1
    trainer.train(steps=2)  # a round beside PPO keeps the role's threads
    assert seen == [3, before]


def test_labels_past_the_buffer_are_let_go_and_still_counted():
    """Labels arriving in parts: the trainer keeps the buffer's labels (and at most the part
    that straddles its start), not every label it was given; the count covers all."""
    data, _ = make_comparisons(1200)
    trainer = RewardTrainer(spec(ensemble_size=2), RewardModelConfig(
        lr=3e-3, batch_size=32, label_buffer=400), seed=0)
    for s in range(0, 1200, 150):
        trainer.add(Comparisons(*(getattr(data, f)[s:s + 150] for f in
                                  ("left_obs", "left_act", "right_obs", "right_act", "mu"))))
        assert len(trainer._set) < 400 + 150
        assert trainer._counts.shape == (2, len(trainer._set))
    assert trainer.num_labels == 1200
    stats = trainer.train(steps=20)
    assert stats["rm_num_labels"] == 1200 and stats["rm_labels_in_buffer"] == 400
    # the held rows are the newest labels
    np.testing.assert_array_equal(trainer._set.mu, data.mu[1200 - len(trainer._set):])


def test_atari_sized_segments_are_evaluated_in_small_chunks(monkeypatch):
    """A chunk of 1,024 Atari pairs would be 5.8 GB of float frames: the evaluation's chunks
    shrink with the segment's size."""
    rng = np.random.default_rng(0)
    n, k = 100, 25
    obs = rng.integers(0, 255, size=(2, n, k, 84, 84, 4), dtype=np.uint8)
    act = rng.integers(0, 6, size=(2, n, k), dtype=np.int64)
    cnn = RewardNetSpec(net="cnn", obs_shape=(84, 84, 4), act_dim=6, ensemble_size=1)
    trainer = RewardTrainer(cnn, RewardModelConfig(batch_size=4), seed=0)
    trainer.add(Comparisons(obs[0], act[0], obs[1], act[1],
                            (rng.random(n) > 0.5).astype(np.float32)))
    sizes = []
    real = trainer._loss
    monkeypatch.setattr(trainer, "_loss", lambda m, idx: (sizes.append(len(idx)), real(m, idx))[1])
    trainer._evaluate(0, np.arange(n), trainer._set.mu)
    assert sum(sizes) == n and max(sizes) <= 64
