"""The stats ``PPOTrainer.step`` returns: TRL v0.11.4's keys, single values as Python floats,
distributions as NumPy arrays."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from rlfleet.algorithms.masked import masked_mean, std
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
