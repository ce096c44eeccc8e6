"""reward/metrics.py: samples scored, latency, the rewards' distribution, errors and timeouts."""

from __future__ import annotations

import pytest

from rlfleet.reward.metrics import RewardMetrics


def sample(metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {**metrics.labels, **labels})


def test_reward_records_samples_distribution_errors_and_timeouts() -> None:
    metrics = RewardMetrics("demo", 0)
    metrics.record_scores([0.5, -0.25, 1.0], seconds=0.01)
    metrics.record_error()
    metrics.record_timeout()
    metrics.record_timeout()
    assert sample(metrics, "rlfleet_reward_samples_total") == 3
    assert sample(metrics, "rlfleet_reward_scoring_seconds_count") == 1
    assert sample(metrics, "rlfleet_reward_value_count") == 3
    assert sample(metrics, "rlfleet_reward_value_bucket", le="0.0") == 1
    assert sample(metrics, "rlfleet_reward_value_bucket", le="0.5") == 2
    assert sample(metrics, "rlfleet_reward_errors_total") == 1
    assert sample(metrics, "rlfleet_reward_timeouts_total") == 2
    with pytest.raises(ValueError, match="sample 1 is nan"):
        metrics.record_scores([0.0, float("nan")], seconds=0.01)
    assert sample(metrics, "rlfleet_reward_samples_total") == 3
