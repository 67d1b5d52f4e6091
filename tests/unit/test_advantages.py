"""The critic-free advantage estimators and the loss aggregation modes, on hand-derived cases."""

import math

import pytest
import torch

from rlhf_ray.core import advantages as A

ONES = torch.ones(6, 2)
NO_KL = torch.zeros(6, 2)


def first_token(adv):
    return [round(float(x), 4) for x in adv[:, 0]]


def test_grpo_standardizes_each_group_and_a_flat_group_gives_zero():
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    adv, ret = A.grpo(scores, NO_KL, ONES, group_size=3)
    # group 1: mean 2, unbiased std 1; group 2: std 0 -> all 0 (not a division by zero)
    assert first_token(adv) == [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert torch.equal(adv[:, 0], adv[:, 1])  # no KL in the reward: the same on every token
    assert torch.equal(adv, ret)


def test_dr_grpo_only_subtracts_the_group_mean():
    scores = torch.tensor([1.0, 2.0, 6.0, 0.0, 2.0, 4.0])
    adv, _ = A.dr_grpo(scores, NO_KL, ONES, group_size=3)
    assert first_token(adv) == [-2.0, -1.0, 3.0, -2.0, 0.0, 2.0]


def test_rloo_baseline_is_the_mean_of_the_other_responses():
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 3.0])
    adv, _ = A.rloo(scores, NO_KL, ONES, group_size=3)
    # 1 - (2+3)/2, 2 - (1+3)/2, 3 - (1+2)/2; 0 - 1.5, 0 - 1.5, 3 - 0
    assert first_token(adv) == [-1.5, 0.0, 1.5, -1.5, -1.5, 3.0]


def test_reinforce_pp_whitens_returns_over_the_batch_and_padding_stays_zero():
    scores = torch.tensor([1.0, 3.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv, ret = A.reinforce_pp(scores, torch.zeros(2, 3), mask)
    assert ret.tolist() == [[1.0, 1.0, 0.0], [3.0, 3.0, 3.0]]
    mean, std = 11 / 5, math.sqrt(((1 - 2.2) ** 2 * 2 + (3 - 2.2) ** 2 * 3) / 5)
    expect = [[(1 - mean) / std] * 2 + [0.0], [(3 - mean) / std] * 3]
    assert torch.allclose(adv, torch.tensor(expect), atol=1e-5)
    assert adv[0, 2] == 0


def test_kl_in_the_reward_is_summed_forward_with_the_discount():
    # score 1 on the last token, -beta*KL on each: rewards [-0.1, 1 - 0.2]; gamma 0.5:
    # G_1 = 0.8, G_0 = -0.1 + 0.5 * 0.8 = 0.3
    _, ret = A.dr_grpo(torch.tensor([1.0, 1.0]), torch.tensor([[-0.1, -0.2], [0.0, 0.0]]),
                       torch.ones(2, 2), group_size=1, gamma=0.5)
    # group of 1: the shaped score is 0, so only the KL remains on row 0
    assert torch.allclose(ret[0], torch.tensor([-0.1 + 0.5 * -0.2, -0.2]))
    _, ret = A.reinforce_pp(torch.tensor([1.0]), torch.tensor([[-0.1, -0.2]]),
                            torch.ones(1, 2), gamma=0.5)
    assert torch.allclose(ret[0], torch.tensor([0.3, 0.8]))


def test_reinforce_pp_baseline_subtracts_the_group_mean_before_whitening():
    scores = torch.tensor([1.0, 3.0, 10.0, 12.0])
    mask = torch.ones(4, 1)
    _, ret = A.reinforce_pp_baseline(scores, torch.zeros(4, 1), mask, group_size=2)
    assert ret[:, 0].tolist() == [-1.0, 1.0, -1.0, 1.0]


def test_groups_that_do_not_divide_the_batch_or_are_too_small_are_refused():
    with pytest.raises(ValueError, match="does not split into groups of 4"):
        A.grpo(torch.zeros(6), NO_KL, ONES, group_size=4)
    with pytest.raises(ValueError, match="rloo needs at least 2"):
        A.rloo(torch.zeros(6), NO_KL, ONES, group_size=1)
    with pytest.raises(ValueError, match="grpo needs at least 2"):
        A.grpo(torch.zeros(6), NO_KL, ONES, group_size=1)


@pytest.mark.parametrize("mode,expect", [("token-mean", 12 / 5), ("seq-mean-token-mean", 2.25),
                                         ("seq-mean-token-sum", 6.0),
                                         ("seq-mean-token-sum-norm", 2.0)])
def test_loss_aggregation_modes(mode, expect):
    terms = torch.tensor([[1.0, 2.0, 99.0], [3.0, 3.0, 3.0]])  # 99 is padding
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert A.agg_loss(terms, mask, mode) == pytest.approx(expect)
    with pytest.raises(ValueError, match="unknown loss aggregation 'mean'"):
        A.agg_loss(terms, mask, "mean")


def test_kl_loss_is_k3_and_clamped():
    lp = torch.tensor([[-1.0, -1.0]])
    ref = torch.tensor([[-1.0, 30.0]])  # log ratio -31 on the 2nd token: k3 = e^31 - 1 - 31
    mask = torch.ones(1, 2)
    assert float(A.kl_loss(lp, ref, mask)) == pytest.approx((0 + 10) / 2)
    unclamped = float(A.kl_loss(lp, ref, mask, clamp=None))
    assert unclamped == pytest.approx((math.exp(31) - 1 - 31) / 2, rel=1e-4)


@pytest.mark.parametrize("estimator", list(A.CRITIC_FREE))
def test_the_two_halves_make_the_estimator(estimator):
    """shape_scores (sequence level, where whole groups are) then token_advantages (per row,
    any shard) equal the estimator's own function, KL in the reward included."""
    torch.manual_seed(0)
    scores, kl = torch.randn(8), -0.1 * torch.rand(8, 5)
    mask = torch.ones(8, 5)
    mask[1, 3:] = 0
    mask[6, 1:] = 0
    want = A.CRITIC_FREE[estimator](scores, kl, mask, group_size=4, gamma=0.9)
    got = A.token_advantages(estimator, A.shape_scores(estimator, scores, 4), kl, mask, 0.9)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("mode", A.AGG_MODES)
def test_aggregation_weights_split_over_micro_batches_and_ranks(mode):
    """Summed over any split of a minibatch, each part weighted with the whole minibatch's
    counts, the weights give agg_loss of the whole."""
    torch.manual_seed(1)
    terms = torch.randn(6, 4)
    mask = (torch.arange(4)[None, :] < torch.tensor([4, 1, 3, 2, 4, 3])[:, None]).float()
    whole = A.agg_loss(terms, mask, mode, norm_len=7)
    n_seq, n_tok = float(len(mask)), float(mask.sum())
    parts = [slice(0, 1), slice(1, 4), slice(4, 6)]
    total = sum((terms[p] * A.agg_weights(mask[p], mode, n_seq, n_tok, 7)).sum() for p in parts)
    assert float(total) == pytest.approx(float(whole), rel=1e-6)
    assert A.default_agg("grpo") == "seq-mean-token-mean"
    assert A.default_agg("dr_grpo") == "seq-mean-token-sum-norm"
    assert A.default_agg("gae") == "token-mean"
