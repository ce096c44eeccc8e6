"""Group baselines of critic-free RL on one score per sample (``[batch]``).

The samples of one prompt share a group id (``group_ids``, ``[batch]`` integers; a group's samples
need not be adjacent). A NaN score marks an unscorable sample, as in TRL 1.16: it is left out of
every group statistic, and its GRPO or RLOO advantage is 0. Statistics of a group with too few
scorable samples are NaN (TRL's ``nanstd``), so those advantages come out 0 too.

:mod:`~rlfleet.algorithms.advantages` broadcasts these over the response tokens for the
registered estimators ``grpo``, ``rloo`` and ``reinforce_pp_baseline``.
"""

from __future__ import annotations

from typing import Literal

import torch

ScaleRewards = Literal["group", "batch", "none"]


def group_sums(values: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the sum of its group's non-NaN values and their count."""
    _, index = torch.unique(group_ids, return_inverse=True)
    num_groups = int(index.max()) + 1
    scorable = ~torch.isnan(values)
    zeros = values.new_zeros(num_groups)
    sums = zeros.index_add(0, index, torch.where(scorable, values, 0.0))
    counts = zeros.index_add(0, index, scorable.to(values.dtype))
    return sums[index], counts[index]


def group_nanmean(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Per sample, the mean of its group's non-NaN values."""
    sums, counts = group_sums(values, group_ids)
    return sums / counts


def group_nanstd(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Per sample, the unbiased (Bessel) std of its group's non-NaN values; NaN for a group of
    fewer than two (TRL 1.16's ``nanstd``)."""
    mean = group_nanmean(values, group_ids)
    variance = group_nanmean((values - mean) ** 2, group_ids)
    _, counts = group_sums(values, group_ids)
    correction = torch.where(counts > 1, counts / (counts - 1), torch.nan)
    return torch.sqrt(variance * correction)


def group_normalized_advantages(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    scale_rewards: ScaleRewards = "group",
    std_eps: float = 1e-4,
) -> torch.Tensor:
    """GRPO's ``A_i = (r_i - mean_group) / (std + std_eps)`` as TRL 1.16's ``GRPOTrainer``.

    ``std`` is the group's unbiased std (``scale_rewards="group"``) or the whole batch's
    (``"batch"``, still centred on the group mean); ``"none"`` only centres (Dr. GRPO).
    """
    advantages = scores - group_nanmean(scores, group_ids)
    if scale_rewards == "group":
        advantages = advantages / (group_nanstd(scores, group_ids) + std_eps)
    elif scale_rewards == "batch":
        advantages = advantages / (group_nanstd(scores, torch.zeros_like(group_ids)) + std_eps)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards must be group, batch or none, not {scale_rewards!r}")
    return torch.nan_to_num(advantages, nan=0.0)


def leave_one_out_advantages(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    normalize_advantages: bool = False,
    std_eps: float = 1e-4,
) -> torch.Tensor:
    """RLOO's ``A_i = r_i - mean of the other scorable r_j of its group`` (Ahmadian et al. 2024),
    as TRL 1.16's ``RLOOTrainer`` (a group of one gets 0; veRL 0.9.1 keeps its score); with
    ``normalize_advantages``, then ``(A - mean(A)) / (std(A) + std_eps)`` over the batch."""
    sums, counts = group_sums(scores, group_ids)
    advantages = scores - (sums - scores) / (counts - 1)
    if normalize_advantages:
        batch = torch.zeros_like(group_ids)
        mean, std = group_nanmean(advantages, batch), group_nanstd(advantages, batch)
        advantages = (advantages - mean) / (std + std_eps)
    return torch.nan_to_num(advantages, nan=0.0)


def group_mean_baseline(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """REINFORCE++-baseline's ``r_i - mean_group`` (veRL 0.9.1: a group of one keeps its score)."""
    sums, counts = group_sums(scores, group_ids)
    return scores - torch.where(counts > 1, sums / counts, 0.0)
