"""Policy and value losses and their aggregation on hand-worked numbers."""

from __future__ import annotations

import math

import torch

from rlfleet.algorithms.losses import (
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    VALUE_LOSSES,
    LossConfig,
    truncated_importance_weights,
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


def test_truncated_importance_weights_are_the_old_over_behaviour_ratio_capped():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.9]]))
    behaviour = torch.log(torch.tensor([[0.5, 0.1, 0.6]]))
    # pi_old / pi_behaviour = (1, 5, 1.5); the cap 2 cuts the 5.
    weights = truncated_importance_weights(old, behaviour, cap=2.0)
    torch.testing.assert_close(weights, torch.tensor([[1.0, 2.0, 1.5]]))


def test_policy_loss_weights_each_token_after_the_clip():
    old = torch.zeros(1, 3)
    logprobs = torch.full((1, 3), math.log(2.0), requires_grad=True)
    advantages = torch.tensor([[1.0, -1.0, 4.0]])
    mask = torch.tensor([[1, 1, 0]])
    weights = torch.tensor([[0.5, 2.0, 7.0]])
    config = LossConfig(cliprange=0.2)
    loss, clipfrac, ratio = POLICY_LOSSES["clipped"](
        logprobs, old, advantages, mask, config, importance_weights=weights
    )
    # Per token, clipped as without weights: -1.2 (clip won) and 2 (unclipped won); weighted
    # 0.5 * -1.2 and 2 * 2, the masked third token counts for nothing.
    torch.testing.assert_close(loss, torch.tensor((0.5 * -1.2 + 2.0 * 2.0) / 2))
    assert clipfrac.item() == 0.5
    torch.testing.assert_close(ratio.detach(), torch.full((1, 3), 2.0))
    loss.backward()
    # Token 0 clipped: no gradient; token 1: d(w * -A * rho / 2)/dlogp = 2 * 1 * 2 / 2.
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 2.0, 0.0]]))


def test_policy_loss_does_not_differentiate_through_the_weights():
    weights = torch.tensor([[1.5, 0.5]], requires_grad=True)
    loss, _, _ = POLICY_LOSSES["clipped"](
        torch.full((1, 2), math.log(1.1)),
        torch.zeros(1, 2),
        torch.ones(1, 2),
        torch.ones(1, 2),
        LossConfig(),
        importance_weights=weights,
    )
    assert not loss.requires_grad


def test_policy_loss_with_unit_weights_equals_the_unweighted_loss():
    generator = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(3, 5, generator=generator)
    old = -torch.rand(3, 5, generator=generator)
    advantages = torch.randn(3, 5, generator=generator)
    mask = (torch.rand(3, 5, generator=generator) > 0.3).long()
    unweighted = POLICY_LOSSES["clipped"](logprobs, old, advantages, mask, LossConfig())
    weighted = POLICY_LOSSES["clipped"](
        logprobs, old, advantages, mask, LossConfig(), importance_weights=torch.ones(3, 5)
    )
    for plain, with_weights in zip(unweighted, weighted, strict=True):
        assert torch.equal(plain, with_weights)


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
