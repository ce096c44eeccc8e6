"""The learner actor's Prometheus metrics (served and found as ``common/metrics.py`` says)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rlfleet.common.metrics import MetricSet, check_non_negative

PPO_STAT_GAUGES = {
    "objective/kl": ("rlfleet_learner_kl", "Mean KL(policy || reference) per sequence."),
    "objective/kl_coef": ("rlfleet_learner_kl_coef", "KL penalty coefficient (beta)."),
    "ppo/loss/policy": ("rlfleet_learner_policy_loss", "Clipped policy loss of the last step."),
    "ppo/loss/value": ("rlfleet_learner_value_loss", "Clipped value loss of the last step."),
    "ppo/loss/total": ("rlfleet_learner_total_loss", "Policy loss + vf_coef * value loss."),
    "ppo/policy/clipfrac": ("rlfleet_learner_clipfrac", "Fraction of clipped policy ratios."),
    "ppo/policy/entropy": ("rlfleet_learner_entropy", "Mean policy entropy per token."),
    "ppo/policy/approxkl": ("rlfleet_learner_approxkl", "Approximate KL(old || new policy)."),
    "ppo/val/clipfrac": ("rlfleet_learner_value_clipfrac", "Fraction of clipped value updates."),
    "ppo/mean_scores": ("rlfleet_learner_mean_reward", "Mean reward of the batch."),
    "ppo/std_scores": ("rlfleet_learner_std_reward", "Std of the batch's scores."),
}
"""PPO stats keys (TRL names) -> (gauge name, help) set by ``LearnerMetrics.record_step``."""


class LearnerMetrics(MetricSet):
    role = "learner"

    def __init__(self, job: str, index: int = 0) -> None:
        super().__init__(job, index)
        self._step = self._histogram("rlfleet_learner_step_seconds", "Seconds per PPO step.")
        self._stats = {
            key: self._gauge(name, f"{documentation} (PPO stat {key})")
            for key, (name, documentation) in PPO_STAT_GAUGES.items()
        }
        self._iteration = self._gauge("rlfleet_learner_iteration", "PPO steps taken.")
        self._version = self._gauge(
            "rlfleet_learner_policy_version", "Latest policy version published."
        )
        self._broadcast = self._histogram(
            "rlfleet_learner_weight_broadcast_seconds", "Seconds to publish new weights."
        )
        self._broadcast_bytes = self._gauge(
            "rlfleet_learner_weight_broadcast_bytes", "Size of the last weights published."
        )

    def record_step(self, stats: Mapping[str, Any], seconds: float, iteration: int) -> None:
        """One PPO step: sets a gauge per ``PPO_STAT_GAUGES`` key of ``stats`` (numbers, numpy
        or torch scalars; every key is required so that no gauge silently stays at zero)."""
        check_non_negative("seconds", seconds)
        missing = [key for key in PPO_STAT_GAUGES if key not in stats]
        if missing:
            raise ValueError(f"PPO stats lack {missing}")
        values = {key: self._scalar(key, stats[key]) for key in PPO_STAT_GAUGES}
        for key, value in values.items():
            self._stats[key].set(value)
        self._step.observe(seconds)
        self._iteration.set(iteration)

    @staticmethod
    def _scalar(key: str, value: Any) -> float:
        try:
            return float(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"PPO stat {key!r} must be a single number, got {value!r}") from error

    def record_weight_broadcast(self, seconds: float, nbytes: int, version: int) -> None:
        """Weights of ``version`` (``nbytes`` in all) published in ``seconds``."""
        check_non_negative("seconds", seconds)
        check_non_negative("nbytes", nbytes)
        self._broadcast.observe(seconds)
        self._broadcast_bytes.set(nbytes)
        self._version.set(version)
