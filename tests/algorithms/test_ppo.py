"""PPO assembled from the registered pieces: advantages, the loss and its stats, early stopping."""

from __future__ import annotations

import math

import pytest
import torch

from rlfleet.algorithms.advantages import AdvantageConfig
from rlfleet.algorithms.losses import LossConfig
from rlfleet.algorithms.masked import masked_whiten
from rlfleet.algorithms.ppo import early_stop, ppo_advantages, ppo_loss


def test_ppo_advantages_are_whitened_gae_of_the_masked_inputs():
    values = torch.tensor([[0.5, 1.0, 1.5, 7.0]])
    rewards = torch.tensor([[0.0, 0.0, 1.0, 3.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    masked_values, advantages, returns = ppo_advantages(
        rewards, values, mask, AdvantageConfig(gamma=0.5, lam=0.5)
    )
    assert masked_values.tolist() == [[0.5, 1.0, 1.5, 0.0]]
    assert returns.tolist() == [[0.40625, 0.625, 1.0, 0.0]]  # see test_advantages.py
    raw = torch.tensor([[-0.09375, -0.375, -0.5, 0.0]])
    assert torch.equal(advantages, masked_whiten(raw, mask))


@pytest.mark.parametrize("whiten_rewards", [False, True])
def test_ppo_advantages_ignore_padding_after_a_response(whiten_rewards):
    values = torch.tensor([[0.5, 1.0, 1.5, 7.0, 9.0]])
    rewards = torch.tensor([[0.0, 0.0, 1.0, 3.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    config = AdvantageConfig(0.5, 0.5)
    padded = ppo_advantages(rewards, values, mask, config, whiten_rewards)
    short = ppo_advantages(rewards[:, :3], values[:, :3], mask[:, :3], config, whiten_rewards)
    for long_tensor, short_tensor in zip(padded, short, strict=True):
        torch.testing.assert_close(long_tensor[:, :3], short_tensor, rtol=0, atol=1e-7)


def test_whitened_rewards_change_the_advantages():
    values = torch.tensor([[0.5, 1.0, 1.5]])
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    mask = torch.ones(1, 3)
    config = AdvantageConfig(1.0, 1.0)
    _, _, returns = ppo_advantages(rewards, values, mask, config, whiten_rewards=True)
    # Rewards (0, 0, 1) scaled to unit variance (std 1/sqrt(3)), mean kept: (0, 0, sqrt(3))
    # shifted by mean (1/3) * (1 - sqrt(3)); with gamma = lam = 1 the returns are reward-to-go.
    whitened = masked_whiten(rewards, mask, shift_mean=False)
    torch.testing.assert_close(returns, whitened.flip(1).cumsum(1).flip(1))


def minibatch(**overrides):
    """Two tokens: rho = 2 on both, A = (1, -1), V = 2 against V_old = 1 and R = (0, 3)."""
    tensors = {
        "logprobs": torch.full((1, 2), math.log(2.0)),
        "vpreds": torch.tensor([[2.0, 2.0]]),
        "entropy": torch.tensor([[1.0, 3.0]]),
        "old_logprobs": torch.zeros(1, 2),
        "old_values": torch.ones(1, 2),
        "advantages": torch.tensor([[1.0, -1.0]]),
        "returns": torch.tensor([[0.0, 3.0]]),
        "mask": torch.ones(1, 2),
    }
    return tensors | overrides


def test_ppo_loss_is_policy_loss_plus_vf_coef_times_value_loss_with_trl_stats():
    config = LossConfig(cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
    result = ppo_loss(**minibatch(), config=config)
    # L_pg = (-1.2 + 2) / 2 = 0.4 (test_losses.py), L_vf = 0.5 * (4 + 3.24) / 2 = 1.81.
    torch.testing.assert_close(result.loss, torch.tensor(0.4 + 0.1 * 1.81))
    expected = {
        "loss/policy": 0.4,
        "loss/value": 1.81,
        "loss/total": 0.581,
        "policy/entropy": 2.0,
        "policy/approxkl": 0.5 * math.log(2.0) ** 2,
        "policy/policykl": -math.log(2.0),
        "policy/clipfrac": 0.5,
        "policy/advantages_mean": 0.0,
        "returns/mean": 1.5,
        "returns/var": 4.5,
        "val/vpred": 2.0,
        "val/error": 2.5,
        "val/clipfrac": 0.5,
        "val/mean": 1.0,
        "val/var": 0.0,
    }
    assert set(result.stats) == set(expected) | {"policy/advantages", "policy/ratio"}
    for key, value in expected.items():
        assert result.stats[key].item() == pytest.approx(value, rel=1e-6), key
    assert result.stats["policy/ratio"].tolist() == pytest.approx([2.0, 2.0])
    assert result.stats["policy/advantages"].tolist() == [1.0, -1.0]


def test_ppo_loss_differentiates_both_heads():
    logprobs = torch.full((1, 2), math.log(1.1), requires_grad=True)
    vpreds = torch.tensor([[1.1, 1.1]], requires_grad=True)
    config = LossConfig(cliprange=0.2, cliprange_value=0.2, vf_coef=0.5)
    result = ppo_loss(**minibatch(logprobs=logprobs, vpreds=vpreds), config=config)
    result.loss.backward()
    # Unclipped: d(-A rho)/dlogp / 2 = -A * 1.1 / 2; d(0.5 (V - R)^2 / 2)/dV * 0.5 = (V - R) / 4.
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.55, 0.55]]))
    torch.testing.assert_close(vpreds.grad, torch.tensor([[1.1 / 4, (1.1 - 3.0) / 4]]))


def test_ppo_loss_weights_only_the_policy_loss_by_the_importance_weights():
    config = LossConfig(cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
    weights = torch.tensor([[0.5, 2.0]])
    result = ppo_loss(**minibatch(), config=config, importance_weights=weights)
    # L_pg = (0.5 * -1.2 + 2 * 2) / 2 = 1.7; L_vf unchanged, 1.81.
    torch.testing.assert_close(result.loss, torch.tensor(1.7 + 0.1 * 1.81))
    assert result.stats["loss/policy"].item() == pytest.approx(1.7)
    assert result.stats["loss/value"].item() == pytest.approx(1.81)
    assert result.stats["policy/clipfrac"].item() == 0.5


def test_a_minibatch_over_the_ratio_threshold_is_skipped_with_zero_losses():
    config = LossConfig(ratio_threshold=1.5)
    with pytest.warns(UserWarning, match=r"average ratio of batch \(2.00\) exceeds threshold 1.50"):
        result = ppo_loss(**minibatch(), config=config)
    assert result.loss is None
    for key in ("loss/policy", "loss/value", "loss/total"):
        assert result.stats[key].item() == 0.0
    assert result.stats["policy/ratio"].tolist() == pytest.approx([2.0, 2.0])


def test_early_stop_beyond_one_and_a_half_times_the_target_kl():
    assert early_stop(torch.tensor(1.6), target_kl=1.0)
    assert not early_stop(torch.tensor(1.5), target_kl=1.0)
