"""PPO with a critic, assembled from the registered pieces: TRL v0.11.4's advantages and loss.

Schulman et al. 2017, "Proximal Policy Optimization Algorithms", with the KL-penalized rewards
of Ziegler et al. 2019 (:mod:`rlfleet.algorithms.rewards`). Two departures from v0.11.4,
where it was wrong: whitened rewards are zero on padding (v0.11.4's depended on how much padding
followed each response), and variances of one value are 0, not NaN
(:mod:`rlfleet.algorithms.masked`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch

from rlfleet.algorithms.advantages import AdvantageConfig, AdvantageEstimator, gae
from rlfleet.algorithms.losses import POLICY_LOSSES, VALUE_LOSSES, LossConfig
from rlfleet.algorithms.masked import masked_mean, masked_var, masked_whiten

EARLY_STOP_KL_FACTOR = 1.5


def ppo_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    config: AdvantageConfig,
    whiten_rewards: bool = False,
    estimator: AdvantageEstimator = gae,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GAE on the masked rewards (whitened first if asked) and values, advantages whitened.

    ``estimator``: TRL's :func:`~rlfleet.algorithms.advantages.gae` over every position (holes
    in ``mask`` hold zeros), or ``masked_gae``, which skips the mask-0 tokens as veRL does with
    multi-turn loss masks. Returns ``(masked values, advantages, returns)``.
    """
    values = values * mask
    rewards = rewards * mask
    if whiten_rewards:
        # Re-masked: v0.11.4 left (0 - mean) * scale + mean on padding after each response,
        # which GAE then carried into the response, an amount that depended on the padding.
        rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
    advantages, returns = estimator(rewards, mask, values, None, config)
    return values, masked_whiten(advantages, mask), returns


@dataclass
class PPOLossOutput:
    loss: torch.Tensor | None
    """What to differentiate; None when the minibatch is skipped (mean ratio over threshold)."""
    stats: dict[str, torch.Tensor]
    """TRL v0.11.4's minibatch stats (``loss/policy``, ``policy/ratio``, ...); zero losses when
    skipped."""


class PPOObjective(NamedTuple):
    loss: torch.Tensor
    """``L_pg + vf_coef * L_vf``."""
    pg_loss: torch.Tensor
    vf_loss: torch.Tensor
    pg_clipfrac: torch.Tensor
    vf_clipfrac: torch.Tensor
    ratio: torch.Tensor


def ppo_objective(
    *,
    logprobs: torch.Tensor,
    vpreds: torch.Tensor,
    old_logprobs: torch.Tensor,
    old_values: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    config: LossConfig,
    importance_weights: torch.Tensor | None = None,
) -> PPOObjective:
    """``L = L_pg + vf_coef * L_vf`` from the policy and value losses ``config`` names, and its
    parts; no skipping, no stats (a micro-batch's part of a minibatch's loss)."""
    vf_loss, vf_clipfrac = VALUE_LOSSES[config.value_loss](
        vpreds, old_values, returns, mask, config
    )
    pg_loss, pg_clipfrac, ratio = POLICY_LOSSES[config.policy_loss](
        logprobs, old_logprobs, advantages, mask, config, importance_weights
    )
    loss = pg_loss + config.vf_coef * vf_loss
    return PPOObjective(loss, pg_loss, vf_loss, pg_clipfrac, vf_clipfrac, ratio)


def ppo_loss(
    *,
    logprobs: torch.Tensor,
    vpreds: torch.Tensor,
    entropy: torch.Tensor,
    old_logprobs: torch.Tensor,
    old_values: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    config: LossConfig,
    importance_weights: torch.Tensor | None = None,
) -> PPOLossOutput:
    """:func:`ppo_objective`, unless the mean ratio ``rho`` exceeds ``config.ratio_threshold``
    (then a warning and no loss), and the minibatch's stats.

    ``importance_weights`` (truncated importance sampling against the generator's policy) weight
    each token's policy loss, after the clip; None leaves TRL v0.11.4's loss unchanged."""
    loss, pg_loss, vf_loss, pg_clipfrac, vf_clipfrac, ratio = ppo_objective(
        logprobs=logprobs,
        vpreds=vpreds,
        old_logprobs=old_logprobs,
        old_values=old_values,
        advantages=advantages,
        returns=returns,
        mask=mask,
        config=config,
        importance_weights=importance_weights,
    )
    avg_ratio = masked_mean(ratio, mask).item()
    trained_loss: torch.Tensor | None = loss
    if avg_ratio > config.ratio_threshold:
        warnings.warn(
            f"The average ratio of batch ({avg_ratio:.2f}) exceeds threshold "
            f"{config.ratio_threshold:.2f}. Skipping batch.",
            stacklevel=2,
        )
        pg_loss, vf_loss, loss = pg_loss * 0.0, vf_loss * 0.0, loss * 0.0
        trained_loss = None
    logprobs, vpreds = logprobs.detach(), vpreds.detach()
    real = mask.bool()
    stats = {
        "loss/policy": pg_loss.detach(),
        "loss/value": vf_loss.detach(),
        "loss/total": loss.detach(),
        "policy/entropy": masked_mean(entropy, mask),
        "policy/approxkl": 0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask),
        "policy/policykl": masked_mean(old_logprobs - logprobs, mask),
        "policy/clipfrac": pg_clipfrac.detach(),
        "policy/advantages": advantages[real],
        "policy/advantages_mean": masked_mean(advantages, mask),
        "policy/ratio": ratio.detach()[real],
        "returns/mean": masked_mean(returns, mask),
        "returns/var": masked_var(returns, mask),
        "val/vpred": masked_mean(vpreds, mask),
        "val/error": masked_mean((vpreds - returns) ** 2, mask),
        "val/clipfrac": vf_clipfrac.detach(),
        "val/mean": masked_mean(old_values, mask),
        "val/var": masked_var(old_values, mask),
    }
    return PPOLossOutput(trained_loss, stats)


def early_stop(policykl: torch.Tensor, target_kl: float) -> bool:
    """Whether the policy moved too far from the rollout's: ``KL > 1.5 * target_kl``."""
    return bool(policykl > EARLY_STOP_KL_FACTOR * target_kl)
