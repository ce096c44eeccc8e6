"""The stats the trainers' ``step`` returns.

PPO's (``step_stats``): TRL v0.11.4's keys, single values as Python floats, distributions as
NumPy arrays. The critic-free trainer's (``mean_metrics``, ``batch_stats``): TRL 1.16's names
where it logs the same thing, the minibatches' loss metrics and the batch's rewards, advantages
and lengths. Both: the phases' wall-clock seconds (``StepTimer``) and how far the generator's
logprobs are from the learner's (``behaviour_mismatch_stats``, and ``correction_stats``: veRL's
mismatch metrics and what the off-policy correction did, under ``rollout/correction/``).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from rlfleet.algorithms.corrections import ResolvedCorrection, mismatch_metrics
from rlfleet.algorithms.masked import masked_mean, masked_var, std
from rlfleet.trainers.forward import ResponseBatch, Rollout


class StepTimer:
    """Wall-clock seconds of a step's phases, as ``time/<prefix>/<phase>`` stats (TRL's
    ``time/ppo/...`` for PPO)."""

    def __init__(self, prefix: str = "ppo") -> None:
        self.prefix = prefix
        self.started = time.time()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.time()
        yield
        self.seconds[f"time/{self.prefix}/{name}"] = time.time() - start

    def stats(self) -> dict[str, float]:
        """Every phase so far and ``time/<prefix>/total``, the time since the timer started."""
        return {**self.seconds, f"time/{self.prefix}/total": time.time() - self.started}


def step_stats(
    batch: ResponseBatch,
    scores: torch.Tensor,
    rollout: Rollout,
    non_score_reward: torch.Tensor,
    minibatch_stats: list[dict[str, torch.Tensor]],
    kl_coef: float,
    learning_rate: float,
) -> dict[str, Any]:
    """The rollout's stats (``objective/*``, ``tokens/*``, scores) and the minibatches' ``ppo/*``
    (means of single values, concatenations of distributions)."""
    mask = batch.mask
    kl_per_sample = (rollout.kls * mask).sum(axis=-1)
    mean_kl = kl_per_sample.mean()
    if mean_kl.item() < -1.0:
        warnings.warn(
            f"KL divergence is starting to become negative: {mean_kl.item():.2f} - this might "
            "be a precursor for failed training. Check the generation kwargs and the "
            "training hyperparameters.",
            stacklevel=3,
        )
    query_lens = torch.tensor(
        [len(q) for q in batch.queries], dtype=torch.float, device=mask.device
    )
    response_lens = batch.lengths.float()
    stats: dict[str, Any] = {
        "objective/kl": mean_kl,
        "objective/kl_dist": kl_per_sample,
        "objective/logprobs": rollout.logprobs,
        "objective/ref_logprobs": rollout.ref_logprobs,
        "objective/kl_coef": kl_coef,
        "objective/entropy": (-rollout.logprobs * mask).sum(axis=-1).mean(),
        "ppo/mean_non_score_reward": masked_mean(non_score_reward, mask),
        "ppo/mean_scores": scores.mean(),
        "ppo/std_scores": std(scores),
        "tokens/queries_len_mean": query_lens.mean(),
        "tokens/queries_len_std": std(query_lens),
        "tokens/queries_dist": query_lens,
        "tokens/responses_len_mean": response_lens.mean(),
        "tokens/responses_len_std": std(response_lens),
        "tokens/responses_dist": response_lens,
    }
    for key in minibatch_stats[0]:
        values = [s[key] for s in minibatch_stats]
        if values[0].dim() == 0:
            stats[f"ppo/{key}"] = torch.stack(values).mean()
        else:
            stats[f"ppo/{key}"] = torch.cat(values)
    returns_var = stats["ppo/returns/var"]
    stats["ppo/val/var_explained"] = (
        1 - stats["ppo/val/error"] / returns_var if returns_var > 0 else returns_var.new_zeros(())
    )
    stats["ppo/learning_rate"] = learning_rate
    return {key: as_python(value) for key, value in stats.items()}


def as_python(value: Any) -> Any:
    """Single values to Python floats, anything longer to a NumPy array (TRL's convention)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().float().numpy()
    if isinstance(value, np.ndarray) and value.size == 1 and value.ndim <= 1:
        return float(value.reshape(()))
    if isinstance(value, (np.floating, int, float)):
        return float(value)
    return value


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


CORRECTION_STAT_PREFIX = "rollout/correction/"
"""Under ``rollout/``: the learner passes such stats through unrenamed and stats.jsonl keeps
them, for every algorithm."""


def correction_stats(
    old_logprobs: torch.Tensor,
    behaviour: torch.Tensor,
    mask: torch.Tensor,
    correction: ResolvedCorrection,
) -> dict[str, torch.Tensor]:
    """The mismatch between the generator's and the learner's old policy on the sampled tokens
    (``k3_kl``, ``kl``, perplexities, chi-squared: ``mismatch_metrics``) and what ``correction``
    did to the batch (``masked_fraction``: the sampled tokens whose loss it dropped, its weights'
    mean, the fractions of ratios beyond its bounds)."""
    with torch.no_grad():
        metrics = {
            **mismatch_metrics(old_logprobs, behaviour, mask),
            **correction(old_logprobs, behaviour, mask).metrics,
        }
    return {CORRECTION_STAT_PREFIX + name: value for name, value in metrics.items()}


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


def batch_stats(
    batch: ResponseBatch,
    loss_mask: torch.Tensor,
    scores: torch.Tensor,
    group_ids: torch.Tensor | None,
    truncated: torch.Tensor,
    advantages: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The batch's rewards (``scores``: each sample's whole reward), advantages and completion
    lengths."""
    stats = {
        "reward/mean": scores.mean(),
        "reward/std": std(scores),
        # TRL 1.16 counts only the tokens the policy sampled (its tool_mask's 1s).
        "completions/mean_length": batch.mask.sum(-1).float().mean(),
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
