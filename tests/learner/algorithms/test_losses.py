"""Policy and value losses and their aggregation on hand-worked numbers."""

from __future__ import annotations

import math

import torch

from rlfleet.learner.algorithms.losses import (
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    VALUE_LOSSES,
    LossConfig,
)


def test_token_mean_averages_over_every_masked_in_token_of_the_batch():
    losses = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert LOSS_AGGREGATIONS["token-mean"](losses, mask).item() == 2.0


def test_policy_loss_clips_the_ratio_against_the_advantage():
    old = torch.zeros(1, 2)
    logprobs = torch.full((1, 2), math.log(2.0))
    # ratio 2: with A = 1 the clipped -1.2 wins, with A = -1 the unclipped 2 wins.
    loss, clipfrac, ratio = POLICY_LOSSES["clipped"](
        logprobs, old, torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), LossConfig(cliprange=0.2)
    )
    torch.testing.assert_close(ratio, torch.full((1, 2), 2.0))
    torch.testing.assert_close(loss, torch.tensor((-1.2 + 2.0) / 2))
    assert clipfrac.item() == 0.5


def test_policy_loss_clips_higher_with_cliprange_high():
    old = torch.zeros(1, 2)
    logprobs = torch.log(torch.tensor([[2.0, 0.5]]))
    # ratio 2, A = 1: clipped at 1 + 0.5 -> -1.5; ratio 0.5, A = -1: clipped at 1 - 0.2 -> 0.8
    # beats the unclipped 0.5. The masked-out third token counts for nothing.
    config = LossConfig(cliprange=0.2, cliprange_high=0.5)
    loss, clipfrac, _ = POLICY_LOSSES["clipped"](
        torch.cat([logprobs, torch.zeros(1, 1)], dim=1),
        torch.cat([old, torch.zeros(1, 1)], dim=1),
        torch.tensor([[1.0, -1.0, 5.0]]),
        torch.tensor([[1, 1, 0]]),
        config,
    )
    torch.testing.assert_close(loss, torch.tensor((-1.5 + 0.8) / 2))
    assert clipfrac.item() == 1.0


def test_policy_loss_gradient_is_zero_where_the_clip_is_active():
    logprobs = torch.tensor([[math.log(2.0), math.log(1.1)]], requires_grad=True)
    loss, _, _ = POLICY_LOSSES["clipped"](
        logprobs, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), LossConfig(cliprange=0.2)
    )
    loss.backward()
    # Token 0 is clipped (ratio 2 > 1.2): no gradient; token 1: d(-A rho / 2)/dlogp = -1.1 / 2.
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, -0.55]]))


def test_value_loss_is_the_larger_of_clipped_and_unclipped():
    old_values = torch.tensor([[1.0, 1.0]])
    vpreds = torch.tensor([[2.0, 2.0]])
    returns = torch.tensor([[0.0, 3.0]])
    # clipped prediction 1.2: (2-0)^2=4 vs 1.44 -> 4; (2-3)^2=1 vs 3.24 -> 3.24 (clipped).
    loss, clipfrac = VALUE_LOSSES["clipped"](
        vpreds, old_values, returns, torch.ones(1, 2), LossConfig(cliprange_value=0.2)
    )
    torch.testing.assert_close(loss, torch.tensor(0.5 * (4 + 3.24) / 2))
    assert clipfrac.item() == 0.5
