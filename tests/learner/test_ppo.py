"""The PPO math of learner.ppo on hand-worked numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import rlfleet.learner.ppo as ppo


def test_every_kl_estimator_is_exactly_zero_when_policy_equals_reference():
    logprobs = torch.log_softmax(torch.randn(3, 5, 11), dim=-1)
    tokens = torch.randint(0, 11, (3, 5, 1))
    sampled = logprobs.gather(-1, tokens).squeeze(-1)
    for estimator in ("kl", "abs", "mse"):
        assert torch.equal(ppo.kl_penalty(sampled, sampled.clone(), estimator), torch.zeros(3, 5))
    assert torch.equal(ppo.full_kl(logprobs, logprobs.clone()), torch.zeros(3, 5))


def test_kl_estimators_on_a_known_log_ratio():
    logprobs, ref_logprobs = torch.tensor([-1.0, -3.0]), torch.tensor([-1.5, -1.0])
    assert ppo.kl_penalty(logprobs, ref_logprobs, "kl").tolist() == [0.5, -2.0]
    assert ppo.kl_penalty(logprobs, ref_logprobs, "abs").tolist() == [0.5, 2.0]
    assert ppo.kl_penalty(logprobs, ref_logprobs, "mse").tolist() == [0.125, 2.0]
    with pytest.raises(ValueError, match="full"):
        ppo.kl_penalty(logprobs, ref_logprobs, "full")


def test_full_kl_is_the_exact_divergence():
    p, q = torch.tensor([0.5, 0.25, 0.25]), torch.tensor([0.25, 0.25, 0.5])
    expected = 0.5 * math.log(2) + 0.25 * math.log(0.5)
    assert ppo.full_kl(p.log(), q.log()).item() == pytest.approx(expected, rel=1e-6)


def test_rewards_put_the_score_on_each_last_response_token():
    kl = torch.tensor([[0.5, 0.25, 1.0], [1.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, non_score = ppo.per_token_rewards(torch.tensor([1.0, -2.0]), kl, mask, kl_coef=0.5)
    assert non_score.tolist() == [[-0.25, -0.125, -0.5], [-0.5, -1.0, -0.0]]
    assert rewards.tolist() == [[-0.25, -0.125, 0.5], [-0.5, -3.0, -0.0]]


def test_gae_on_a_hand_worked_three_step_example():
    # gamma = lam = 0.5, V = (0.5, 1, 1.5), r = (0, 0, 1):
    # delta = (0 + 0.5*1 - 0.5, 0 + 0.5*1.5 - 1, 1 + 0 - 1.5) = (0, -0.25, -0.5)
    # A_2 = -0.5, A_1 = -0.25 + 0.25*A_2 = -0.375, A_0 = 0 + 0.25*A_1 = -0.09375
    values = torch.tensor([[0.5, 1.0, 1.5]])
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    mask = torch.ones(1, 3, dtype=torch.long)
    masked_values, advantages, returns = ppo.generalized_advantages(
        values, rewards, mask, gamma=0.5, lam=0.5
    )
    assert masked_values.tolist() == values.tolist()
    assert returns.tolist() == [[0.40625, 0.625, 1.0]]
    raw = torch.tensor([[-0.09375, -0.375, -0.5]])
    assert torch.equal(advantages, ppo.masked_whiten(raw, mask))


def test_gae_ignores_padding_after_a_response():
    values = torch.tensor([[0.5, 1.0, 1.5, 7.0, 9.0]])
    rewards = torch.tensor([[0.0, 0.0, 1.0, 3.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    for whiten_rewards in (False, True):
        padded = ppo.generalized_advantages(values, rewards, mask, 0.5, 0.5, whiten_rewards)
        short = ppo.generalized_advantages(
            values[:, :3], rewards[:, :3], mask[:, :3], 0.5, 0.5, whiten_rewards
        )
        for long_tensor, short_tensor in zip(padded, short, strict=True):
            torch.testing.assert_close(long_tensor[:, :3], short_tensor, rtol=0, atol=1e-7)


def test_masked_moments_and_whitening():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert ppo.masked_mean(values, mask).item() == 2.0
    assert ppo.masked_var(values, mask).item() == 1.0
    assert ppo.masked_var(values, mask, unbiased=False).item() == pytest.approx(2 / 3)
    whitened = ppo.masked_whiten(values, mask)
    scale = 1 / math.sqrt(1 + ppo.WHITEN_EPS)
    torch.testing.assert_close(whitened[0, :3], torch.tensor([-scale, 0.0, scale]))
    shifted = ppo.masked_whiten(values, mask, shift_mean=False)
    torch.testing.assert_close(shifted[0, :3], torch.tensor([2 - scale, 2.0, 2 + scale]))


def test_one_value_has_zero_variance_not_nan():
    one = torch.tensor([[0.7, 5.0]])
    mask = torch.tensor([[1, 0]])
    assert ppo.masked_var(one, mask).item() == 0.0
    assert ppo.masked_whiten(one, mask)[0, 0].item() == 0.0
    assert ppo.std(torch.tensor([3.0])).item() == 0.0
    with pytest.raises(ValueError, match="no values"):
        ppo.masked_var(one, torch.zeros(1, 2))


def test_policy_loss_clips_the_ratio_against_the_advantage():
    old = torch.zeros(1, 2)
    logprobs = torch.full((1, 2), math.log(2.0))
    mask = torch.ones(1, 2)
    # ratio 2: with A = 1 the clipped -1.2 wins, with A = -1 the unclipped 2 wins.
    loss, clipfrac, ratio = ppo.clipped_policy_loss(
        logprobs, old, torch.tensor([[1.0, -1.0]]), mask, cliprange=0.2
    )
    torch.testing.assert_close(ratio, torch.full((1, 2), 2.0))
    torch.testing.assert_close(loss, torch.tensor((-1.2 + 2.0) / 2))
    assert clipfrac.item() == 0.5


def test_value_loss_is_the_larger_of_clipped_and_unclipped():
    old_values = torch.tensor([[1.0, 1.0]])
    vpreds = torch.tensor([[2.0, 2.0]])
    returns = torch.tensor([[0.0, 3.0]])
    # clipped prediction 1.2: (2-0)^2=4 vs 1.44 -> 4; (2-3)^2=1 vs 3.24 -> 3.24 (clipped).
    loss, clipfrac = ppo.clipped_value_loss(vpreds, old_values, returns, torch.ones(1, 2), 0.2)
    torch.testing.assert_close(loss, torch.tensor(0.5 * (4 + 3.24) / 2))
    assert clipfrac.item() == 0.5


def test_adaptive_kl_controller_moves_at_most_twenty_percent_per_horizon():
    controller = ppo.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    controller.update(6.0, n_steps=128)
    assert controller.value == 0.2
    controller.update(60.0, n_steps=128)
    assert controller.value == pytest.approx(0.2 * (1 + 0.2 * 128 / 10000), rel=1e-12)
    controller.update(0.0, n_steps=10000)
    assert controller.value == pytest.approx(0.2 * 1.00256 * 0.8, rel=1e-12)


def test_fixed_kl_controller_never_moves():
    controller = ppo.FixedKLController(0.3)
    controller.update(100.0, n_steps=128)
    assert controller.value == 0.3


def test_running_moments_match_the_whole_stream():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=n).astype(np.float32) for n in (8, 5, 16)]
    moments = ppo.RunningMoments()
    for batch in batches:
        batch_mean, batch_std = moments.update(torch.from_numpy(batch))
        assert batch_mean == pytest.approx(batch.mean(), rel=1e-5)
        assert batch_std == pytest.approx(batch.std(ddof=1), rel=1e-5)
    stream = np.concatenate(batches)
    assert moments.mean == pytest.approx(stream.mean(), rel=1e-5)
    assert moments.std == pytest.approx(stream.std(ddof=1), rel=1e-5)


def test_running_moments_of_a_single_score_stay_finite():
    moments = ppo.RunningMoments()
    assert moments.update(torch.tensor([2.0])) == (2.0, 0.0)
    assert (moments.mean, moments.std) == (2.0, 1.0)
    moments.update(torch.tensor([4.0]))
    assert moments.mean == pytest.approx(3.0)
    assert moments.std == pytest.approx(math.sqrt(2.0), rel=1e-5)
