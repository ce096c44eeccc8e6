"""The reward actor's Prometheus metrics (served and found as ``common/metrics.py`` says)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from prometheus_client import Histogram

from rlfleet.common.metrics import ROLE_LABELS, MetricSet, check_non_negative

REWARD_BUCKETS = (-10, -5, -2, -1, -0.5, -0.25, 0, 0.25, 0.5, 1, 2, 5, 10)


class RewardMetrics(MetricSet):
    role = "reward"

    def __init__(
        self, job: str, index: int = 0, reward_buckets: Sequence[float] = REWARD_BUCKETS
    ) -> None:
        super().__init__(job, index)
        self._samples = self._counter("rlfleet_reward_samples_total", "Samples scored.")
        self._latency = self._histogram(
            "rlfleet_reward_scoring_seconds", "Seconds per scoring call."
        )
        # With negative buckets the client exposes no _sum (a sum that can fall is no counter):
        # the mean reward is the learner's rlfleet_learner_mean_reward.
        self._values = self._histogram(
            "rlfleet_reward_value", "Distribution of the rewards given.", reward_buckets
        )
        self._component_values = Histogram(
            "rlfleet_reward_component_value",
            "Distribution of each named reward component's raw scores (reward.components).",
            (*ROLE_LABELS, "component"),
            registry=self.registry,
            buckets=reward_buckets,
        )
        self._errors = self._counter(
            "rlfleet_reward_errors_total", "Scoring calls that failed with an error."
        )
        self._timeouts = self._counter(
            "rlfleet_reward_timeouts_total", "Scoring calls that ran past reward.timeout_s."
        )

    def record_scores(self, scores: Sequence[float], seconds: float) -> None:
        """One scoring call that gave ``scores`` (one per sample) in ``seconds``."""
        check_non_negative("seconds", seconds)
        for i, score in enumerate(scores):
            if not math.isfinite(score):
                raise ValueError(f"score of sample {i} is {score!r}: rewards must be finite")
        self._samples.inc(len(scores))
        self._latency.observe(seconds)
        for score in scores:
            self._values.observe(score)

    def record_component_scores(self, parts: Mapping[str, Sequence[float]]) -> None:
        """Each named component's raw scores of one scoring call."""
        for name, scores in parts.items():
            values = self._component_values.labels(**self.labels, component=name)
            for score in scores:
                values.observe(score)

    def record_error(self) -> None:
        self._errors.inc()

    def record_timeout(self) -> None:
        self._timeouts.inc()
