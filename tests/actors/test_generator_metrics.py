"""actors/metrics.py: the generator's rollouts, tokens, latency, policy version and busy flag."""

from __future__ import annotations

import pytest

from rlfleet.actors.metrics import GeneratorMetrics


def sample(metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {**metrics.labels, **labels})


def test_generator_records_rollouts_tokens_latency_version_and_busy() -> None:
    metrics = GeneratorMetrics("demo", 1)
    metrics.record_generation(rollouts=8, tokens=96, seconds=0.25)
    metrics.record_generation(rollouts=4, tokens=40, seconds=0.5)
    metrics.record_weight_load(seconds=0.125, version=3)
    assert sample(metrics, "rlfleet_generator_rollouts_total") == 12
    assert sample(metrics, "rlfleet_generator_tokens_total") == 136
    assert sample(metrics, "rlfleet_generator_generation_seconds_count") == 2
    assert sample(metrics, "rlfleet_generator_generation_seconds_sum") == 0.75
    assert sample(metrics, "rlfleet_generator_generation_seconds_bucket", le="0.25") == 1
    assert sample(metrics, "rlfleet_generator_weight_load_seconds_sum") == 0.125
    assert sample(metrics, "rlfleet_generator_policy_version") == 3
    assert sample(metrics, "rlfleet_generator_busy") == 0
    with pytest.raises(RuntimeError), metrics.busy():
        assert sample(metrics, "rlfleet_generator_busy") == 1
        raise RuntimeError("engine failed")
    assert sample(metrics, "rlfleet_generator_busy") == 0


def test_bad_values_are_rejected_naming_the_field() -> None:
    metrics = GeneratorMetrics("demo", 0)
    with pytest.raises(ValueError, match="tokens must be a non-negative number, got -3"):
        metrics.record_generation(rollouts=1, tokens=-3, seconds=0.1)
    with pytest.raises(ValueError, match="seconds must be a non-negative number"):
        metrics.record_weight_load(seconds=-1.0, version=1)
    assert sample(metrics, "rlfleet_generator_rollouts_total") == 0
