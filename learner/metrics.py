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
"""PPO stats keys (TRL names) -> (gauge name, help) set by ``LearnerMetrics.record_step``; the
gauges are these, for every algorithm."""

ROLLOUT_STAT_GAUGES = {
    "rollout/logprob_diff_mean": (
        "rlfleet_learner_logprob_diff",
        "Mean |learner's old-policy logprob - generator's logprob| per response token.",
    ),
    "rollout/tis_capped_fraction": (
        "rlfleet_learner_tis_capped_fraction",
        "Fraction of tokens whose importance weight hit the tis_cap.",
    ),
    "rollout/truncated_fraction": (
        "rlfleet_learner_truncated_fraction",
        "Fraction of rollouts cut off by max_new_tokens.",
    ),
}
"""Sampling-side stats of every algorithm -> gauges, set whenever a step reports them."""

StatGauges = Mapping[str, tuple[str, str]]


def critic_free_stat_gauges(
    beta: float, kl_coef: float, trained: bool = True
) -> dict[str, tuple[str, str]]:
    """The critic-free trainer's stats (learner/registry.py prefixes them ``critic_free/``) -> the
    shared gauges: its rewards and, when the step ``trained`` on at least one token (with
    ``mask_truncated_completions`` it may train on none), its loss, entropy, clip fraction and
    the KL to the reference (the loss's with ``beta``, else the reward's with ``kl_coef``; none
    without a reference). The PPO-only gauges (value loss and clip fraction, approx KL,
    kl_coef) stay unset."""
    gauges = {
        "critic_free/reward/mean": PPO_STAT_GAUGES["ppo/mean_scores"],
        "critic_free/reward/std": PPO_STAT_GAUGES["ppo/std_scores"],
    }
    if kl_coef > 0 and beta == 0:
        gauges["critic_free/kl_in_reward"] = PPO_STAT_GAUGES["objective/kl"]
    if not trained:
        return gauges
    gauges["critic_free/loss"] = PPO_STAT_GAUGES["ppo/loss/total"]
    gauges["critic_free/entropy"] = PPO_STAT_GAUGES["ppo/policy/entropy"]
    gauges["critic_free/clip_ratio/region_mean"] = PPO_STAT_GAUGES["ppo/policy/clipfrac"]
    if beta > 0:
        gauges["critic_free/kl"] = PPO_STAT_GAUGES["objective/kl"]
    return gauges


class LearnerMetrics(MetricSet):
    role = "learner"

    def __init__(self, job: str, index: int = 0) -> None:
        super().__init__(job, index)
        self._step = self._histogram("rlfleet_learner_step_seconds", "Seconds per training step.")
        self._gauges = {
            name: self._gauge(name, f"{documentation} (stat {key})")
            for key, (name, documentation) in {**PPO_STAT_GAUGES, **ROLLOUT_STAT_GAUGES}.items()
        }
        self._iteration = self._gauge("rlfleet_learner_iteration", "Training steps taken.")
        self._version = self._gauge(
            "rlfleet_learner_policy_version", "Latest policy version published."
        )
        self._broadcast = self._histogram(
            "rlfleet_learner_weight_broadcast_seconds", "Seconds to publish new weights."
        )
        self._broadcast_bytes = self._gauge(
            "rlfleet_learner_weight_broadcast_bytes", "Size of the last weights published."
        )

    def record_step(
        self,
        stats: Mapping[str, Any],
        seconds: float,
        iteration: int,
        stat_gauges: StatGauges = PPO_STAT_GAUGES,
    ) -> None:
        """One training step: sets a gauge per ``stat_gauges`` key of ``stats`` (numbers, numpy
        or torch scalars; every key is required so that no gauge silently stays at zero).
        ``stat_gauges``: ``PPO_STAT_GAUGES`` or ``critic_free_stat_gauges(...)``."""
        check_non_negative("seconds", seconds)
        missing = [key for key in stat_gauges if key not in stats]
        if missing:
            raise ValueError(f"learner stats lack {missing}")
        gauges = {**stat_gauges, **{k: g for k, g in ROLLOUT_STAT_GAUGES.items() if k in stats}}
        values = {key: self._scalar(key, stats[key]) for key in gauges}
        for key, value in values.items():
            self._gauges[gauges[key][0]].set(value)
        self._step.observe(seconds)
        self._iteration.set(iteration)

    @staticmethod
    def _scalar(key: str, value: Any) -> float:
        try:
            return float(value)
        except (TypeError, ValueError) as error:
            message = f"learner stat {key!r} must be a single number, got {value!r}"
            raise ValueError(message) from error

    def record_weight_broadcast(self, seconds: float, nbytes: int, version: int) -> None:
        """Weights of ``version`` (``nbytes`` in all) published in ``seconds``."""
        check_non_negative("seconds", seconds)
        check_non_negative("nbytes", nbytes)
        self._broadcast.observe(seconds)
        self._broadcast_bytes.set(nbytes)
        self._version.set(version)
