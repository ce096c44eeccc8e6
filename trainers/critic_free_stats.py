"""The stats ``CriticFreeTrainer.step`` returns (TRL 1.16's names where it logs the same thing):
the minibatches' loss metrics, the batch's rewards, advantages and lengths, and how far the
generator's logprobs are from the learner's."""

from __future__ import annotations

import math

import torch

from rlfleet.algorithms.masked import masked_mean, masked_var, std
from rlfleet.trainers.forward import ResponseBatch


def behaviour_mismatch_stats(
    old_logprobs: torch.Tensor,
    behaviour: torch.Tensor,
    mask: torch.Tensor,
    tis_cap: float | None,
) -> dict[str, torch.Tensor]:
    """How far the generator's logprobs are from the learner's: ``mean |old - behaviour|`` and the
    fraction of tokens whose importance weight ``tis_cap`` cuts (0 without a cap)."""
    log_ratio = old_logprobs - behaviour
    capped = log_ratio.exp() > (math.inf if tis_cap is None else tis_cap)
    return {
        "rollout/logprob_diff_mean": masked_mean(log_ratio.abs(), mask),
        "rollout/tis_capped_fraction": masked_mean(capped.float(), mask),
    }


def mean_metrics(minibatch_metrics: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The minibatches' metrics: means, but the extreme of ``*_min`` and ``*_max``."""
    if not minibatch_metrics:
        return {}
    merged = {}
    for key in minibatch_metrics[0]:
        values = torch.stack([m[key] for m in minibatch_metrics])
        if key.endswith("_min"):
            merged[key] = values.min()
        elif key.endswith("_max"):
            merged[key] = values.max()
        else:
            merged[key] = values.mean()
    return merged


def rollout_stats(
    batch: ResponseBatch,
    loss_mask: torch.Tensor,
    scores: torch.Tensor,
    group_ids: torch.Tensor | None,
    truncated: torch.Tensor,
    advantages: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The batch's rewards, advantages and completion lengths."""
    stats = {
        "reward/mean": scores.mean(),
        "reward/std": std(scores),
        "completions/mean_length": batch.lengths.float().mean(),
        "completions/truncated_ratio": truncated.float().mean(),
    }
    if loss_mask.any():
        stats["advantages/mean"] = masked_mean(advantages, loss_mask)
        stats["advantages/std"] = masked_var(advantages, loss_mask).sqrt()
    if group_ids is not None:
        _, index = torch.unique(group_ids, return_inverse=True)
        num_groups = int(index.max()) + 1
        highest = scores.new_full((num_groups,), -math.inf).scatter_reduce(0, index, scores, "amax")
        lowest = scores.new_full((num_groups,), math.inf).scatter_reduce(0, index, scores, "amin")
        stats["reward/frac_zero_std_groups"] = (highest == lowest).float().mean()
    return stats
