"""PPO-for-LM math pinned to hand-derived numbers and invariances (no Ray, no model)."""

import math
from itertools import combinations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rlhf_ray.core.bradley_terry import ranking_loss
from rlhf_ray.core.lm_ppo import (
    AdaptiveKLController,
    DoublingKLController,
    FixedKLController,
    gae,
    kl_controller_from_state,
    kl_estimate,
    make_kl_controller,
    masked_mean,
    masked_whiten,
    micro_batches,
    policy_loss,
    sampler_correction,
    token_rewards,
    value_loss,
)


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    r = torch.tensor([[1.0, 2.0, 3.0]])
    v = torch.tensor([[0.5, 0.25, 4.0]])
    m = torch.ones(1, 3)
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[6 - 0.5, 5 - 0.25, 3 - 4.0]]))
    torch.testing.assert_close(ret, torch.tensor([[6.0, 5.0, 3.0]]))


def test_gae_lambda_zero_is_the_one_step_td_error():
    r = torch.tensor([[1.0, 2.0, 3.0]])
    v = torch.tensor([[0.5, 0.25, 4.0]])
    adv, _ = gae(r, v, torch.ones(1, 3), gamma=0.5, lam=0.0)
    # delta_t = r_t + gamma V_{t+1} - V_t; the last token has no successor
    torch.testing.assert_close(adv, torch.tensor([[1 + 0.125 - 0.5, 2 + 2.0 - 0.25, 3 - 4.0]]))


def test_gae_hand_derived_general_case():
    g, lam = 0.9, 0.8
    r = torch.tensor([[0.0, 1.0]])
    v = torch.tensor([[2.0, 3.0]])
    adv, _ = gae(r, v, torch.ones(1, 2), gamma=g, lam=lam)
    d1 = 1.0 - 3.0
    d0 = 0.0 + g * 3.0 - 2.0
    torch.testing.assert_close(adv, torch.tensor([[d0 + g * lam * d1, d1]]))


def test_nothing_after_eos_leaks_into_advantages():
    """Rewards and values at padded positions change nothing at real ones, and the episode
    ends at the last real token (no bootstrap from a pad's value)."""
    m = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    r = torch.tensor([[1.0, 2.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    v = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    adv, ret = gae(r, v, m, 0.99, 0.95)
    r2, v2 = r.clone(), v.clone()
    r2[0, 2:], v2[0, 2:] = 100.0, -50.0
    adv2, ret2 = gae(r2, v2, m, 0.99, 0.95)
    torch.testing.assert_close(adv, adv2)
    torch.testing.assert_close(ret, ret2)
    assert adv[0, 2:].abs().sum() == 0 and ret[0, 2:].abs().sum() == 0
    # row 0 alone equals a 2-token episode
    alone, _ = gae(r[:1, :2], v[:1, :2], torch.ones(1, 2), 0.99, 0.95)
    torch.testing.assert_close(adv[:1, :2], alone)


def test_token_rewards_pay_kl_everywhere_and_the_score_at_the_last_real_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    m = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = token_rewards(torch.tensor([2.0, -1.0]), kl, beta=0.5, mask=m)
    torch.testing.assert_close(out, torch.tensor([[-0.05, -0.1 + 2.0, 0.0],
                                                  [-0.2, -0.25, -0.3 - 1.0]]))


def test_kl_estimators_on_known_numbers():
    lp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_estimate(lp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_estimate(lp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_estimate(lp, ref, "k3").item() == pytest.approx((0.5 - 1) + math.log(2))
    with pytest.raises(ValueError, match="unknown KL estimator 'k9'"):
        kl_estimate(lp, ref, "k9")


def test_k1_and_k3_are_unbiased_and_k3_is_never_negative():
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.2, 0.5, 0.3])
    true_kl = float((p * (p / q).log()).sum())
    g = torch.Generator().manual_seed(0)
    idx = torch.multinomial(p, 200_000, replacement=True, generator=g)
    lp, lq = p.log()[idx], q.log()[idx]
    assert kl_estimate(lp, lq, "k1").mean().item() == pytest.approx(true_kl, abs=0.01)
    k3 = kl_estimate(lp, lq, "k3")
    assert k3.mean().item() == pytest.approx(true_kl, abs=0.01)
    assert (k3 >= 0).all()


def test_adaptive_kl_controller_on_known_numbers():
    c = AdaptiveKLController(beta=0.1, target=6.0, horizon=10_000)
    # KL 9 is 50% over target: the error is clipped to +0.2
    assert c.update(9.0, 256) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))
    c = AdaptiveKLController(beta=0.1, target=6.0, horizon=10_000)
    assert c.update(6.6, 256) == pytest.approx(0.1 * (1 + 0.1 * 256 / 10_000))
    c = AdaptiveKLController(beta=0.1, target=6.0, horizon=10_000)
    assert c.update(0.0, 1000) == pytest.approx(0.1 * (1 - 0.2 * 0.1))
    assert FixedKLController(0.05).update(100.0, 256) == 0.05


def test_adaptive_kl_floor_stops_windup_and_beta_still_climbs():
    free = AdaptiveKLController(beta=0.05, target=6.0, horizon=32)
    floored = AdaptiveKLController(beta=0.05, target=6.0, horizon=32, min_beta=0.025)
    for _ in range(17):  # the policy has not moved yet: KL far under target
        free.update(0.5, 16)
        floored.update(0.5, 16)
    assert free.beta == pytest.approx(0.05 * 0.9**17)  # the windup: ~0.008
    assert floored.beta == 0.025
    assert floored.update(12.0, 16) == pytest.approx(0.025 * 1.1)  # over target: climbs at once
    again = kl_controller_from_state(floored.state_dict())
    assert again == floored and again.min_beta == 0.025
    # checkpoints from before the floor existed resume without one
    old = {"kind": "adaptive", "beta": 0.1, "target": 6.0, "horizon": 500}
    assert kl_controller_from_state(old).min_beta == 0.0


def test_kl_controller_state_round_trips_for_resume():
    c = AdaptiveKLController(beta=0.1, target=6.0, horizon=500)
    for kl in (9.0, 3.0, 7.0):
        c.update(kl, 64)
    again = kl_controller_from_state(c.state_dict())
    assert again == c
    assert again.update(8.0, 64) == c.update(8.0, 64)
    assert kl_controller_from_state(FixedKLController(0.2).state_dict()) == FixedKLController(0.2)
    with pytest.raises(ValueError, match="unknown KL controller kind"):
        kl_controller_from_state({"kind": "pid"})


def test_policy_loss_clips_and_reports():
    adv = torch.tensor([[1.0, -1.0]])
    old = torch.zeros(1, 2)
    m = torch.ones(1, 2)
    loss, stats = policy_loss(old.clone(), old, adv, m, clip=0.2)  # ratio 1: -mean(A)
    assert loss.item() == pytest.approx(0.0) and stats["clipfrac"] == 0.0
    new = torch.log(torch.tensor([[1.5, 1.5]]))
    loss, stats = policy_loss(new, old, adv, m, clip=0.2)
    # A>0: min(1.5, 1.2) * 1 -> 1.2 (clipped); A<0: max over -A*r -> 1.5 (unclipped)
    assert loss.item() == pytest.approx((-1.2 + 1.5) / 2)
    assert stats["clipfrac"] == pytest.approx(0.5)
    assert stats["approx_kl"] == pytest.approx(0.5 - math.log(1.5))


def test_sampler_correction_on_known_numbers():
    """Truncated importance sampling of the sampler's tokens: w = min(pi / pi_sampler, cap),
    padding 0; sampler_kl is k3 of KL(sampler || learner); weights scale each token's term."""
    learner = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.3, 0.3, 0.3]]))
    sampler = torch.log(torch.tensor([[0.25, 0.4, 0.1], [0.3, 0.6, 0.3]]))
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    w, stats = sampler_correction(learner, sampler, mask, cap=3.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.5, 3.0], [1.0, 0.5, 0.0]]))
    r = torch.tensor([2.0, 0.5, 9.0, 1.0, 0.5])
    assert stats["sampler_kl"] == pytest.approx(float((r - 1 - r.log()).mean()), rel=1e-5)
    assert stats["sampler_is_weight_mean"] == pytest.approx(7.0 / 5, rel=1e-6)
    assert stats["sampler_is_clipped_frac"] == pytest.approx(1 / 5)
    none, same = sampler_correction(learner, learner, mask)
    assert none is None and same == {"sampler_kl": 0.0}
    adv, old = torch.ones(2, 3), learner.clone()
    plain, _ = policy_loss(learner, old, adv, mask)
    weighted, _ = policy_loss(learner, old, adv, mask, weights=w)
    # at ratio 1 each token's term is -A = -1: the weighted loss is -mean(w)
    assert float(plain) == pytest.approx(-1.0) and float(weighted) == pytest.approx(-7.0 / 5)


def test_padding_never_reaches_a_loss():
    m = torch.tensor([[1.0, 1.0, 0.0]])
    lp = torch.tensor([[-1.0, -2.0, -3.0]])
    adv = torch.tensor([[1.0, 2.0, 0.0]])
    base, _ = policy_loss(lp, lp.detach() - 0.1, adv, m)
    lp2, adv2 = lp.clone(), adv.clone()
    lp2[0, 2], adv2[0, 2] = 50.0, 1e6
    moved, _ = policy_loss(lp2, lp2.detach() - 0.1, adv2, m)
    assert base.item() == pytest.approx(moved.item())
    v, ret = torch.tensor([[1.0, 2.0, 99.0]]), torch.tensor([[1.5, 2.0, -99.0]])
    vl, _ = value_loss(v, v.detach(), ret, m, clip=None)
    assert vl.item() == pytest.approx(0.5 * (0.25 + 0.0) / 2)


def test_value_loss_clipping():
    ret = torch.tensor([[1.0]])
    old = torch.tensor([[0.0]])
    new = torch.tensor([[0.9]], requires_grad=True)
    loss, stats = value_loss(new, old, ret, torch.ones(1, 1), clip=0.2)
    # clipped value 0.2 is further from the return: the pessimistic (max) error is kept
    assert loss.item() == pytest.approx(0.5 * 0.8 ** 2) and stats["vf_clipfrac"] == 1.0


def test_whitening_ignores_padding():
    x = torch.tensor([[1.0, 3.0, 1000.0]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    w = masked_whiten(x, m)
    torch.testing.assert_close(w, torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-4, rtol=0)
    assert masked_mean(x, m).item() == 2.0


def test_ranking_loss_is_all_pairs_normalized_by_k_choose_2():
    r = torch.tensor([[0.3, -1.0, 2.0, 0.5]])
    order = torch.tensor([[2, 0, 3, 1]])  # best first
    pairs = [(order[0, i], order[0, j]) for i, j in combinations(range(4), 2)]
    expected = sum(-F.logsigmoid(r[0, w] - r[0, l]) for w, l in pairs) / 6
    assert ranking_loss(r, order).item() == pytest.approx(expected.item(), rel=1e-6)


def test_ranking_loss_k2_is_the_pair_loss_and_one_prompt_weighs_the_same_whatever_k():
    r = torch.tensor([[1.0, 0.0]])
    assert ranking_loss(r, torch.tensor([[0, 1]])).item() == pytest.approx(
        -F.logsigmoid(torch.tensor(1.0)).item())
    # an undecided model (all rewards equal) pays log 2 per prompt for K = 2 and for K = 9
    # alike: normalized by C(K,2), not summed over the 36 pairs
    for k in (2, 5, 9):
        assert ranking_loss(torch.zeros(3, k), torch.arange(k).repeat(3, 1)).item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="at least 2 responses"):
        ranking_loss(torch.zeros(1, 1), torch.zeros(1, 1))


def test_micro_batches_by_rows_and_by_tokens():
    """Fixed size: chunks in order. Token budget: every row once, each micro batch padded to
    its own longest prompt and response within the budget (a longer row alone), short rows
    packed more densely than long ones."""
    rng = np.random.default_rng(0)
    p_len = rng.integers(3, 30, size=40)
    r_len = rng.integers(1, 20, size=40)
    idx = rng.permutation(40)[:32]
    fixed = micro_batches(idx, p_len, r_len, max_rows=5)
    assert [len(m) for m in fixed] == [5] * 6 + [2]
    assert np.array_equal(np.concatenate(fixed), idx)
    for budget in (40, 100, 300):
        plan = micro_batches(idx, p_len, r_len, max_rows=5, max_tokens=budget)
        assert sorted(np.concatenate(plan).tolist()) == sorted(idx.tolist())
        for m in plan:
            cost = len(m) * (p_len[m].max() + r_len[m].max())
            assert cost <= budget or len(m) == 1
    plan = micro_batches(idx, p_len, r_len, max_rows=5, max_tokens=100)
    assert len({len(m) for m in plan}) > 1  # rows per micro batch follow the lengths
    first, last = plan[0], plan[-1]  # longest rows first
    assert (p_len[first] + r_len[first]).min() >= (p_len[last] + r_len[last]).max()
    assert len(micro_batches(idx, p_len, r_len, 5, max_tokens=10**6)) == 1
    long = micro_batches(np.arange(3), np.array([50, 50, 50]), np.array([20, 20, 20]), 5, 60)
    assert [len(m) for m in long] == [1, 1, 1]


def test_whitening_over_ranks_is_whitening_of_the_whole_batch():
    """The learner's whitening (global moments through an allreduce of a few floats): two
    ranks with half the batch each give exactly what one rank with all of it gives."""
    import threading

    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64)
    m = (torch.rand(6, 5) > 0.3).to(torch.float64)
    whole = masked_whiten(x, m)
    barrier, sums, lock = threading.Barrier(2), {}, threading.Lock()

    def allreduce(rank: int):
        calls = iter(range(100))

        def reduce(*xs: float) -> list[float]:  # sum over both ranks, as dist.all_reduce
            key = next(calls)
            with lock:
                acc = sums.setdefault(key, [0.0] * len(xs))
                sums[key] = [a + b for a, b in zip(acc, xs)]
            barrier.wait(timeout=10)
            out = list(sums[key])
            barrier.wait(timeout=10)
            return out
        return reduce

    halves = {}

    def rank(r: int) -> None:
        rows = slice(0, 3) if r == 0 else slice(3, 6)
        halves[r] = masked_whiten(x[rows], m[rows], allreduce=allreduce(r))

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    torch.testing.assert_close(torch.cat([halves[0], halves[1]]), whole, rtol=0, atol=1e-12)
    alone = masked_whiten(x[:3], m[:3])  # a rank whitening its shard alone would differ
    assert (alone - whole[:3]).abs().max() > 1e-3


def test_the_ppo_papers_doubling_kl_rule():
    c = DoublingKLController(beta=0.1, target=6.0)
    assert c.update(9.1, 16) == pytest.approx(0.2)  # over 1.5 x target: doubled
    assert c.update(8.9, 16) == pytest.approx(0.2)  # within [target / 1.5, 1.5 x target]: kept
    assert c.update(4.1, 16) == pytest.approx(0.2)
    assert c.update(3.9, 16) == pytest.approx(0.1)  # under target / 1.5: halved
    floored = DoublingKLController(beta=0.04, target=6.0, min_beta=0.025)
    assert floored.update(0.0, 16) == 0.025
    again = kl_controller_from_state(floored.state_dict())
    assert again == floored and isinstance(again, DoublingKLController)
    assert make_kl_controller("doubling", 0.1, 6.0, 500, 0.0) == DoublingKLController(0.1, 6.0)
    with pytest.raises(ValueError, match="unknown KL controller 'pid'"):
        make_kl_controller("pid", 0.1, 6.0, 500)
