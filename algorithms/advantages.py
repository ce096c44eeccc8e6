"""Advantage estimators: ``(rewards, mask, values, group_ids, config) -> (advantages, returns)``.

``rewards`` are per-token ``[batch, time]`` (an outcome reward sits on the last token, so
``rewards.sum(-1)`` is each sequence's return), ``values`` the critic's ``V_t`` (None without a
critic), ``group_ids`` ``[batch]`` integers that mark the samples of one prompt (None when samples
are not grouped). The caller masks its inputs (zero where ``mask`` is 0) and whitens the outputs
if its algorithm does; an estimator that needs ``values`` or ``group_ids`` raises a ValueError
without them.

The critic-free estimators (``grpo``, ``rloo``, ``reinforce_pp``, ``reinforce_pp_baseline``)
whiten or normalise inside, as their peers (TRL 1.16, veRL 0.9.1) do, and zero their advantages
where ``mask`` is 0. The outcome ones take each sample's score as ``rewards.sum(-1)`` over every
position, so a per-token KL penalty in the rewards (``rewards.per_token_rewards``) counts as TRL's
RLOO counts it, and a score on a row that ``mask`` hides entirely (TRL's
``mask_truncated_completions``) still enters its group's statistics; their returns equal their
advantages (veRL's convention; there is no critic to fit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from rlfleet.algorithms.baselines import (
    ScaleRewards,
    group_mean_baseline,
    group_normalized_advantages,
    leave_one_out_advantages,
)
from rlfleet.algorithms.masked import masked_whiten
from rlfleet.algorithms.registry import Registry


@dataclass(frozen=True)
class AdvantageConfig:
    """The estimators' settings; each estimator reads its own."""

    gamma: float = 1.0
    """Discount factor."""
    lam: float = 0.95
    """GAE's lambda: 0 gives the one-step TD error, 1 the Monte-Carlo return minus ``V_t``."""
    scale_rewards: ScaleRewards = "group"
    """GRPO's divisor (TRL 1.16's name): the group's std, the batch's, or none (only centred)."""
    std_eps: float = 1e-4
    """Added to a std before dividing by it (TRL 1.16: 1e-4; veRL's GRPO: 1e-6)."""
    normalize_advantages: bool = False
    """RLOO: normalise the advantages over the batch (TRL 1.16 ``RLOOConfig``'s name)."""


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


@register_advantage_estimator("masked_gae")
def masked_gae(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor | None,
    group_ids: torch.Tensor | None,
    config: AdvantageConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over the mask-1 tokens only, veRL 0.9.1's ``compute_gae_advantage_return`` (before
    its whitening): a mask-0 token (an environment observation inside a multi-turn response)
    passes ``V_{t+1}`` and the running advantage through unchanged, so a turn's last sampled token
    bootstraps from the value of the next turn's first sampled token. Its reward and value are
    never read; on a mask-0 token the advantage is the one carried through it. On a mask without
    holes this is :func:`gae` on every mask-1 token."""
    if values is None:
        raise ValueError("the masked_gae advantage estimator needs the critic's values")
    gamma, lam = config.gamma, config.lam
    next_values = torch.zeros_like(values[:, 0])
    last_advantage = torch.zeros_like(values[:, 0])
    advantages_reversed = []
    for t in reversed(range(rewards.shape[-1])):
        sampled = mask[:, t].bool()
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        advantage = delta + gamma * lam * last_advantage
        next_values = torch.where(sampled, values[:, t], next_values)
        last_advantage = torch.where(sampled, advantage, last_advantage)
        advantages_reversed.append(last_advantage)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


def outcome_advantages_over_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One advantage per sample ``[batch]`` on each of its response tokens ``[batch, time]``."""
    return advantages.unsqueeze(-1) * mask


def needs_groups(name: str, group_ids: torch.Tensor | None) -> torch.Tensor:
    if group_ids is None:
        raise ValueError(f"the {name} advantage estimator needs the samples' group ids")
    return group_ids


@register_advantage_estimator("grpo")
def grpo(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor | None,
    group_ids: torch.Tensor | None,
    config: AdvantageConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO (Shao et al. 2024): each score minus its group's mean, over the group's (or batch's)
    std plus ``config.std_eps``, on every response token; TRL 1.16's ``GRPOTrainer``."""
    scores = rewards.sum(-1)
    sequence_advantages = group_normalized_advantages(
        scores, needs_groups("grpo", group_ids), config.scale_rewards, config.std_eps
    )
    advantages = outcome_advantages_over_tokens(sequence_advantages, mask)
    return advantages, advantages


@register_advantage_estimator("rloo")
def rloo(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor | None,
    group_ids: torch.Tensor | None,
    config: AdvantageConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO (Ahmadian et al. 2024): each score minus the mean of the other scores of its group, on
    every response token; normalised over the batch with ``config.normalize_advantages``."""
    scores = rewards.sum(-1)
    sequence_advantages = leave_one_out_advantages(
        scores, needs_groups("rloo", group_ids), config.normalize_advantages, config.std_eps
    )
    advantages = outcome_advantages_over_tokens(sequence_advantages, mask)
    return advantages, advantages


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """``G_t = r_t + gamma G_{t+1}`` over the masked-in tokens; a masked-out token passes the
    return behind it through unchanged and gets 0 (veRL 0.9.1)."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[-1])):
        running = torch.where(mask[:, t].bool(), rewards[:, t] + gamma * running, running)
        returns[:, t] = running * mask[:, t]
    return returns


@register_advantage_estimator("reinforce_pp")
def reinforce_pp(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor | None,
    group_ids: torch.Tensor | None,
    config: AdvantageConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025): discounted returns of the per-token rewards (KL penalty included),
    whitened over every response token of the batch; returns unwhitened. veRL 0.9.1's definition
    (unbiased variance, ``rsqrt(var + 1e-8)``; OpenRLHF whitens with the biased variance)."""
    returns = discounted_returns(rewards, mask, config.gamma)
    return masked_whiten(returns, mask) * mask, returns


@register_advantage_estimator("reinforce_pp_baseline")
def reinforce_pp_baseline(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor | None,
    group_ids: torch.Tensor | None,
    config: AdvantageConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++-baseline (Hu 2025): each score minus its group's mean on every response token,
    whitened over every response token of the batch (veRL 0.9.1; scores must be finite)."""
    centred = group_mean_baseline(rewards.sum(-1), needs_groups("reinforce_pp_baseline", group_ids))
    tokens = outcome_advantages_over_tokens(centred, mask)
    advantages = masked_whiten(tokens, mask) * mask
    return advantages, advantages
