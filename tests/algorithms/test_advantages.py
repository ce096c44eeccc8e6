"""Advantage estimators on hand-worked numbers."""

from __future__ import annotations

import pytest
import torch

from rlfleet.algorithms.advantages import ADVANTAGE_ESTIMATORS, AdvantageConfig


def gae(rewards, mask, values, config):
    return ADVANTAGE_ESTIMATORS["gae"](rewards, mask, values=values, group_ids=None, config=config)


def test_gae_on_a_hand_worked_three_step_example():
    # gamma = lam = 0.5, V = (0.5, 1, 1.5), r = (0, 0, 1):
    # delta = (0 + 0.5*1 - 0.5, 0 + 0.5*1.5 - 1, 1 + 0 - 1.5) = (0, -0.25, -0.5)
    # A_2 = -0.5, A_1 = -0.25 + 0.25*A_2 = -0.375, A_0 = 0 + 0.25*A_1 = -0.09375; R = A + V.
    values = torch.tensor([[0.5, 1.0, 1.5]])
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    advantages, returns = gae(rewards, torch.ones(1, 3), values, AdvantageConfig(0.5, 0.5))
    assert advantages.tolist() == [[-0.09375, -0.375, -0.5]]
    assert returns.tolist() == [[0.40625, 0.625, 1.0]]


def test_gae_with_lambda_one_is_the_monte_carlo_return_minus_the_value():
    values = torch.tensor([[0.5, 1.0, 1.5]])
    rewards = torch.tensor([[1.0, 2.0, 4.0]])
    advantages, returns = gae(rewards, torch.ones(1, 3), values, AdvantageConfig(1.0, 1.0))
    assert returns.tolist() == [[7.0, 6.0, 4.0]]
    assert advantages.tolist() == [[6.5, 5.0, 2.5]]


def test_gae_over_zero_padding_equals_gae_without_it():
    values = torch.tensor([[0.5, 1.0, 1.5, 0.0, 0.0]])
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    config = AdvantageConfig(0.5, 0.5)
    padded = gae(rewards, mask, values, config)
    short = gae(rewards[:, :3], mask[:, :3], values[:, :3], config)
    for long_tensor, short_tensor in zip(padded, short, strict=True):
        assert torch.equal(long_tensor[:, :3], short_tensor)
        assert torch.equal(long_tensor[:, 3:], torch.zeros(1, 2))


def test_gae_needs_values():
    with pytest.raises(ValueError, match="gae advantage estimator needs the critic's values"):
        gae(torch.ones(1, 2), torch.ones(1, 2), None, AdvantageConfig())
