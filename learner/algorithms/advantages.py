"""Advantage estimators: ``(rewards, mask, values, group_ids, config) -> (advantages, returns)``.

``rewards`` are per-token ``[batch, time]`` (an outcome reward sits on the last token, so
``rewards.sum(-1)`` is each sequence's return), ``values`` the critic's ``V_t`` (None without a
critic), ``group_ids`` ``[batch]`` integers that mark the samples of one prompt (None when samples
are not grouped). The caller masks its inputs (zero where ``mask`` is 0) and whitens the outputs
if its algorithm does; an estimator that needs ``values`` or ``group_ids`` raises a ValueError
without them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from rlfleet.learner.algorithms.registry import Registry


@dataclass(frozen=True)
class AdvantageConfig:
    """The estimators' settings; each estimator reads its own."""

    gamma: float = 1.0
    """Discount factor."""
    lam: float = 0.95
    """GAE's lambda: 0 gives the one-step TD error, 1 the Monte-Carlo return minus ``V_t``."""


class AdvantageEstimator(Protocol):
    def __call__(
        self,
        rewards: torch.Tensor,
        mask: torch.Tensor,
        values: torch.Tensor | None,
        group_ids: torch.Tensor | None,
        config: AdvantageConfig,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")
register_advantage_estimator = ADVANTAGE_ESTIMATORS.register


@register_advantage_estimator("gae")
def gae(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor | None,
    group_ids: torch.Tensor | None,
    config: AdvantageConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE (Schulman et al. 2016): ``delta_t = r_t + gamma V_{t+1} - V_t``,
    ``A_t = delta_t + gamma lam A_{t+1}``, returns ``R_t = A_t + V_t``; ``V_T = A_T = 0`` past
    the last position. Runs over every position: padding holds zeros, so it adds nothing."""
    if values is None:
        raise ValueError("the gae advantage estimator needs the critic's values")
    gamma, lam = config.gamma, config.lam
    steps = rewards.shape[-1]
    last_advantage: torch.Tensor | float = 0.0
    advantages_reversed = []
    for t in reversed(range(steps)):
        next_values = values[:, t + 1] if t < steps - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_advantage = delta + gamma * lam * last_advantage
        advantages_reversed.append(last_advantage)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values
    return advantages, returns
