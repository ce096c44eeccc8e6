"""Policy losses, value losses and the aggregations that reduce per-token losses to one number.

A policy loss is ``(logprobs, old_logprobs, advantages, mask, config, importance_weights=None) ->
PolicyLossOutput``, a value loss ``(vpreds, old_values, returns, mask, config) -> (loss, clip
fraction)``, an aggregation ``(per-token losses, mask) -> loss``. Schulman et al. 2017,
"Proximal Policy Optimization Algorithms"; the formulas of TRL v0.11.4's ``PPOTrainer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from rlfleet.algorithms.masked import masked_mean
from rlfleet.algorithms.registry import Registry


@dataclass(frozen=True)
class LossConfig:
    """The losses' settings (TRL v0.11.4's names); each loss reads its own."""

    cliprange: float = 0.2
    """Epsilon: the ratio is clipped to ``[1 - cliprange, 1 + cliprange_high]``."""
    cliprange_high: float | None = None
    """The upper clip where it differs from ``cliprange`` (DAPO's clip-higher); None: the same."""
    cliprange_value: float = 0.2
    """How far a value prediction may move from the old value before it is clipped."""
    vf_coef: float = 0.1
    """The value loss's weight in an actor-critic loss."""
    ratio_threshold: float = 10.0
    """A minibatch whose mean ratio exceeds this is skipped (its loss is not trained on)."""
    policy_loss: str = "clipped"
    """The policy loss's name in :data:`POLICY_LOSSES`."""
    value_loss: str = "clipped"
    """The value loss's name in :data:`VALUE_LOSSES`."""
    aggregation: str = "token-mean"
    """The per-token losses' aggregation's name in :data:`LOSS_AGGREGATIONS`."""


class PolicyLossOutput(NamedTuple):
    loss: torch.Tensor
    clipfrac: torch.Tensor
    """Fraction of tokens where the clipped term was the larger."""
    ratio: torch.Tensor
    """``rho = pi / pi_old`` per token."""


class PolicyLoss(Protocol):
    def __call__(
        self,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        config: LossConfig,
        importance_weights: torch.Tensor | None = None,
    ) -> PolicyLossOutput: ...


class ValueLoss(Protocol):
    def __call__(
        self,
        vpreds: torch.Tensor,
        old_values: torch.Tensor,
        returns: torch.Tensor,
        mask: torch.Tensor,
        config: LossConfig,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class LossAggregation(Protocol):
    def __call__(self, losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...


POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")
VALUE_LOSSES: Registry[ValueLoss] = Registry("value loss")
LOSS_AGGREGATIONS: Registry[LossAggregation] = Registry("loss aggregation")
register_policy_loss = POLICY_LOSSES.register
register_value_loss = VALUE_LOSSES.register
register_loss_aggregation = LOSS_AGGREGATIONS.register

# The mean over every token of the batch (TRL v0.11.4's PPO).
register_loss_aggregation("token-mean")(masked_mean)


class MicroBatchShare(Protocol):
    def __call__(self, micro_mask: torch.Tensor, minibatch_mask: torch.Tensor) -> float: ...


def token_share(micro_mask: torch.Tensor, minibatch_mask: torch.Tensor) -> float:
    """A token mean's part in a micro-batch: its tokens over the minibatch's."""
    return float(micro_mask.sum()) / max(float(minibatch_mask.sum()), 1.0)


def row_share(micro_mask: torch.Tensor, minibatch_mask: torch.Tensor) -> float:
    """A mean over rows' part in a micro-batch: its rows over the minibatch's."""
    return micro_mask.shape[0] / minibatch_mask.shape[0]


def whole_share(micro_mask: torch.Tensor, minibatch_mask: torch.Tensor) -> float:
    """A loss normalised by a constant of the whole batch: each micro-batch's loss is its part."""
    return 1.0


MICRO_BATCH_SHARES: Registry[MicroBatchShare] = Registry("micro-batch share")
"""By aggregation name: the factor that makes a micro-batch's aggregated loss its part of the
minibatch's, so that the parts (over micro-batches and ranks) sum to the minibatch's loss."""
MICRO_BATCH_SHARES.register("token-mean")(token_share)


def present_rows(mask: torch.Tensor) -> torch.Tensor:
    """1 for each row with any mask-1 token, 0 for a row the mask hides entirely, ``[rows]``."""
    return (mask.sum(-1) > 0).float()


def present_row_share(micro_mask: torch.Tensor, minibatch_mask: torch.Tensor) -> float:
    """A mean over the rows with any token: the micro-batch's such rows over the minibatch's."""
    return float(present_rows(micro_mask).sum()) / max(float(present_rows(minibatch_mask).sum()), 1)


@register_loss_aggregation("seq-mean-token-sum")
def sequence_mean_of_token_sums(losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """veRL 0.9.1's ``seq-mean-token-sum``: each row's sum over its mask-1 tokens, averaged over
    the rows that have any (a row the mask hides entirely counts in neither sum nor count)."""
    present = present_rows(mask)
    return ((losses * mask).sum(-1) * present).sum() / present.sum().clamp(min=1)


@register_loss_aggregation("seq-mean-token-sum-norm")
def sequence_mean_of_token_sums_over_width(
    losses: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """veRL 0.9.1's ``seq-mean-token-sum-norm`` (Dr. GRPO) with its default scale: the
    ``seq-mean-token-sum`` over the padded width, a constant of the batch."""
    return sequence_mean_of_token_sums(losses, mask) / mask.shape[-1]


@register_loss_aggregation("seq-mean-token-mean")
def sequence_mean_of_token_means(losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """veRL 0.9.1's ``seq-mean-token-mean``: each row's mean over its mask-1 tokens, averaged over
    the rows that have any (its ``+ 1e-8`` in the row's count kept, for the same rounding)."""
    counts = mask.sum(-1)
    present = present_rows(mask)
    return ((losses * mask).sum(-1) / (counts + 1e-8) * present).sum() / present.sum().clamp(min=1)


for _name in ("seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"):
    MICRO_BATCH_SHARES.register(_name)(present_row_share)


@register_policy_loss("clipped")
def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: LossConfig,
    importance_weights: torch.Tensor | None = None,
) -> PolicyLossOutput:
    """PPO-clip: ``max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps_high))`` per token, with
    ``rho = pi / pi_old``, times ``importance_weights`` when given (truncated importance sampling:
    :func:`truncated_importance_weights`, after the clip), aggregated by ``config.aggregation``."""
    epsilon = config.cliprange
    epsilon_high = epsilon if config.cliprange_high is None else config.cliprange_high
    ratio = torch.exp(logprobs - old_logprobs)
    losses_unclipped = -advantages * ratio
    losses_clipped = -advantages * torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon_high)
    losses = torch.max(losses_unclipped, losses_clipped)
    if importance_weights is not None:
        losses = losses * importance_weights.detach()
    aggregate = LOSS_AGGREGATIONS[config.aggregation]
    loss = aggregate(losses, mask)
    clipfrac = masked_mean(torch.gt(losses_clipped, losses_unclipped).float(), mask)
    return PolicyLossOutput(loss, clipfrac, ratio)


def truncated_importance_weights(
    old_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, cap: float
) -> torch.Tensor:
    """``w = min(pi_old / pi_behaviour, cap)`` per token: makes the samples of the behaviour
    policy (the generator's) stand for the learner's old policy (TRL 1.16's ``token_truncate``)."""
    return torch.clamp(torch.exp(old_logprobs - behaviour_logprobs), max=cap)


@register_value_loss("clipped")
def clipped_value_loss(
    vpreds: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    config: LossConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``0.5 * max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2)`` per token,
    aggregated by ``config.aggregation``, and the fraction of tokens where the clipped term won."""
    vpred_clipped = torch.clamp(
        vpreds, old_values - config.cliprange_value, old_values + config.cliprange_value
    )
    losses_unclipped = (vpreds - returns) ** 2
    losses_clipped = (vpred_clipped - returns) ** 2
    aggregate = LOSS_AGGREGATIONS[config.aggregation]
    loss = 0.5 * aggregate(torch.max(losses_unclipped, losses_clipped), mask)
    clipfrac = masked_mean(torch.gt(losses_clipped, losses_unclipped).float(), mask)
    return loss, clipfrac
