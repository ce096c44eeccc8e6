"""The GRPO-family policy loss (GRPO, BNPO, Dr. GRPO, DAPO, GSPO): TRL 1.16's
``GRPOTrainer._compute_loss`` as one pure function of log-probabilities.

Shao et al. 2024 (GRPO), Liu et al. 2025 (Dr. GRPO), Yu et al. 2025 (DAPO: clip-higher and the
token-level loss), Zheng et al. 2025 (GSPO: the sequence-level importance ratio). The per-token
losses are reduced to one number by the aggregation ``config.loss_type`` names in
:data:`LOSS_TYPES`, ``(per_token_loss, mask, config, num_items_in_batch) -> loss``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

import torch

from rlfleet.algorithms.kl import KL_PENALTIES
from rlfleet.algorithms.losses import (
    MicroBatchShare,
    row_share,
    token_share,
    whole_share,
)
from rlfleet.algorithms.registry import Registry


@dataclass(frozen=True)
class CriticFreeLossConfig:
    """The loss's settings, with TRL 1.16 ``GRPOConfig``'s names and defaults."""

    loss_type: str = "dapo"
    """How per-token losses are aggregated: a name in :data:`LOSS_TYPES`."""
    epsilon: float = 0.2
    """The ratio is clipped below at ``1 - epsilon``."""
    epsilon_high: float | None = None
    """The ratio is clipped above at ``1 + epsilon_high`` (DAPO's clip-higher); None: epsilon."""
    delta: float | None = None
    """Two-sided GRPO (INTELLECT-2): the unclipped ratio is also capped at ``delta``; None: off."""
    beta: float = 0.0
    """Weight of the k3 KL to the reference in the loss; 0: no reference log-probabilities."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """The ratio per token, or per sequence as ``exp(mean over its tokens of log ratio)`` (GSPO)."""
    use_bias_correction_kl: bool = True
    """Multiply the KL term by the (differentiable) importance ratio (DeepSeek-V3.2)."""
    max_completion_length: int | None = None
    """``dr_grpo``'s constant: the loss is the token sum over ``batch * max_completion_length``."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step: each micro-batch's loss is scaled down to its share."""
    steps_per_generation: int = 1
    """Optimizer micro-steps per generation batch (``dapo``'s ``num_items_in_batch`` spans it)."""


class CriticFreeLossOutput(NamedTuple):
    loss: torch.Tensor
    """What to differentiate."""
    metrics: dict[str, torch.Tensor]
    """TRL 1.16's logged values: ``kl`` (with ``beta``), ``clip_ratio/low_mean``,
    ``clip_ratio/high_mean``, ``clip_ratio/region_mean``, ``clip_ratio/low_min``,
    ``clip_ratio/high_max``."""


class LossTypeAggregation(Protocol):
    def __call__(
        self,
        per_token_loss: torch.Tensor,
        mask: torch.Tensor,
        config: CriticFreeLossConfig,
        num_items_in_batch: float | None,
    ) -> torch.Tensor: ...


LOSS_TYPES: Registry[LossTypeAggregation] = Registry("loss type")
register_loss_type = LOSS_TYPES.register
LOSS_TYPE_SHARES: Registry[MicroBatchShare] = Registry("loss type's micro-batch share")
"""By loss type: the factor that makes a micro-batch's loss its part of the minibatch's (see
``MICRO_BATCH_SHARES`` in losses.py): rows for the means over sequences, tokens for the token
mean, none for ``dapo``'s constant of the whole generation batch."""
LOSS_TYPE_SHARES.update(grpo=row_share, bnpo=token_share, dr_grpo=row_share, dapo=whole_share)


def masked_token_sum(per_token_loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (per_token_loss * mask).sum()


@register_loss_type("grpo")
def sequence_mean_of_token_means(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    config: CriticFreeLossConfig,
    num_items_in_batch: float | None,
) -> torch.Tensor:
    """GRPO: the mean over sequences of each sequence's token mean (longer sequences weigh less
    per token)."""
    token_means = (per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return token_means.mean() / config.gradient_accumulation_steps


@register_loss_type("bnpo")
def token_mean(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    config: CriticFreeLossConfig,
    num_items_in_batch: float | None,
) -> torch.Tensor:
    """BNPO: the mean over the (micro-)batch's tokens."""
    loss = masked_token_sum(per_token_loss, mask) / mask.sum().clamp(min=1.0)
    return loss / config.gradient_accumulation_steps


@register_loss_type("dr_grpo")
def token_sum_over_max_length(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    config: CriticFreeLossConfig,
    num_items_in_batch: float | None,
) -> torch.Tensor:
    """Dr. GRPO: the token sum over ``batch size * max_completion_length`` (a constant, so no
    length bias)."""
    if config.max_completion_length is None:
        raise ValueError("loss_type dr_grpo needs max_completion_length")
    denominator = per_token_loss.size(0) * config.max_completion_length
    loss = masked_token_sum(per_token_loss, mask) / denominator
    return loss / config.gradient_accumulation_steps


@register_loss_type("dapo")
def token_sum_over_generation_tokens(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    config: CriticFreeLossConfig,
    num_items_in_batch: float | None,
) -> torch.Tensor:
    """DAPO: the token sum over ``num_items_in_batch``, the completion tokens of the whole
    generation batch, rescaled to one accumulation window; None: this batch's token count."""
    items = float(mask.sum()) if num_items_in_batch is None else float(num_items_in_batch)
    normalizer = max(items, 1.0) * config.gradient_accumulation_steps / config.steps_per_generation
    return masked_token_sum(per_token_loss, mask) / normalizer


def log_importance_weights(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor, level: str
) -> torch.Tensor:
    """``log pi / pi_old`` per token ``[B, T]``, or per sequence ``[B, 1]`` as the mean over its
    tokens."""
    log_ratio = logprobs - old_logprobs
    if level == "token":
        return log_ratio
    if level == "sequence":
        return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    raise ValueError(f"importance_sampling_level must be token or sequence, not {level!r}")


def critic_free_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: CriticFreeLossConfig,
    num_items_in_batch: float | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
) -> CriticFreeLossOutput:
    """``-min(rho A, clip(rho, 1 - eps, 1 + eps_high) A) + beta * KL_k3`` per token, aggregated by
    ``config.loss_type``; TRL 1.16's ``GRPOTrainer._compute_loss``.

    ``logprobs`` (with gradient), ``old_logprobs`` (the policy that sampled; on-policy pass
    ``logprobs.detach()``, as TRL does with ``num_iterations: 1``) and ``ref_logprobs`` (None when
    ``beta`` is 0) are ``[B, T]``; ``advantages`` ``[B]`` or ``[B, T]``.
    ``importance_sampling_ratio`` (``[B, T]`` or ``[B, 1]``, optional) multiplies the policy term,
    as TRL's vLLM importance-sampling correction does.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    coef_1 = torch.exp(
        log_importance_weights(logprobs, old_logprobs, mask, config.importance_sampling_level)
    )
    if config.beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("beta is not 0: the loss needs the reference log-probabilities")
        per_token_kl = KL_PENALTIES["k3"](logprobs, ref_logprobs)
        if config.use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1
    epsilon_high = config.epsilon if config.epsilon_high is None else config.epsilon_high
    coef_2 = torch.clamp(coef_1, 1 - config.epsilon, 1 + epsilon_high)
    if config.delta is not None:
        coef_1 = torch.clamp(coef_1, max=config.delta)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if importance_sampling_ratio is not None:
        per_token_loss = per_token_loss * importance_sampling_ratio
    if config.beta != 0.0:
        per_token_loss = per_token_loss + config.beta * per_token_kl
    loss = LOSS_TYPES[config.loss_type](per_token_loss, mask, config, num_items_in_batch)

    with torch.no_grad():
        is_low_clipped = (coef_1 < 1 - config.epsilon) & (advantages < 0)
        is_high_clipped = (coef_1 > 1 + epsilon_high) & (advantages > 0)
        metrics = clip_ratio_metrics(is_low_clipped, is_high_clipped, mask)
        if config.beta != 0.0:
            metrics["kl"] = batch_mean(per_token_kl, mask)
    return CriticFreeLossOutput(loss, metrics)


def batch_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean over the batch's tokens, or over its sequences for one value per sequence
    (``[B, 1]``), as TRL logs it."""
    if values.shape[1] == 1:
        return values.sum() / max(values.shape[0], 1)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def sequence_means(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each sequence's token mean (NaN for an empty one), or the per-sequence value itself."""
    if values.shape[1] == 1:
        return values.squeeze(1)
    return (values * mask).sum(-1) / mask.sum(-1)


def clip_ratio_metrics(
    is_low_clipped: torch.Tensor, is_high_clipped: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Where the clip acts (ratio below ``1 - eps`` with ``A < 0``, above ``1 + eps_high`` with
    ``A > 0``): batch means, and the extreme sequence means, as TRL 1.16 names them."""
    low, high = is_low_clipped.float(), is_high_clipped.float()
    region = (is_low_clipped | is_high_clipped).float()
    low_per_sequence = sequence_means(low, mask)
    high_per_sequence = sequence_means(high, mask)
    return {
        "clip_ratio/low_mean": batch_mean(low, mask),
        "clip_ratio/high_mean": batch_mean(high, mask),
        "clip_ratio/region_mean": batch_mean(region, mask),
        "clip_ratio/low_min": nan_extreme(low_per_sequence, torch.min),
        "clip_ratio/high_max": nan_extreme(high_per_sequence, torch.max),
    }


def nan_extreme(
    values: torch.Tensor, extreme: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``extreme`` (min or max) of the non-NaN values; NaN when there are none (TRL's nanmin)."""
    kept = values[~values.isnan()]
    return extreme(kept) if kept.numel() else values.new_tensor(torch.nan)
