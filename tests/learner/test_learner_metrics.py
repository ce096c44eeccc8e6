"""learner/metrics.py: TRL's PPO stats as gauges, step time, and each weight publication."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlfleet.learner.metrics import PPO_STAT_GAUGES, LearnerMetrics

PPO_STATS = {
    "objective/kl": 0.5,
    "objective/kl_coef": 0.2,
    "ppo/loss/policy": -0.125,
    "ppo/loss/value": 0.25,
    "ppo/loss/total": 0.0,
    "ppo/policy/clipfrac": 0.0625,
    "ppo/policy/entropy": 3.5,
    "ppo/policy/approxkl": 0.01,
    "ppo/val/clipfrac": 0.5,
    "ppo/mean_scores": 0.75,
    "ppo/std_scores": 1.5,
    "objective/kl_dist": np.array([0.5, 0.5]),
}
"""What a TRL-style step returns: every mapped key, plus an array the metrics do not read."""


def sample(metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {**metrics.labels, **labels})


def test_learner_maps_ppo_stats_to_gauges() -> None:
    metrics = LearnerMetrics("demo", 0)
    stats = {**PPO_STATS, "objective/kl": torch.tensor(0.5), "ppo/loss/value": np.float32(0.25)}
    metrics.record_step(stats, seconds=1.5, iteration=7)
    for key, (name, _) in PPO_STAT_GAUGES.items():
        assert sample(metrics, name) == PPO_STATS[key], key
    assert sample(metrics, "rlfleet_learner_step_seconds_sum") == 1.5
    assert sample(metrics, "rlfleet_learner_iteration") == 7
    metrics.record_weight_broadcast(seconds=0.0625, nbytes=1_000_000, version=7)
    assert sample(metrics, "rlfleet_learner_weight_broadcast_seconds_sum") == 0.0625
    assert sample(metrics, "rlfleet_learner_weight_broadcast_bytes") == 1_000_000
    assert sample(metrics, "rlfleet_learner_policy_version") == 7


def test_learner_rejects_missing_and_non_scalar_stats_naming_the_key() -> None:
    metrics = LearnerMetrics("demo", 0)
    with pytest.raises(ValueError, match="ppo/std_scores"):
        metrics.record_step({k: v for k, v in PPO_STATS.items() if k != "ppo/std_scores"}, 1.0, 1)
    with pytest.raises(ValueError, match="'objective/kl' must be a single number"):
        metrics.record_step({**PPO_STATS, "objective/kl": np.array([0.1, 0.2])}, 1.0, 1)
    assert sample(metrics, "rlfleet_learner_kl") == 0
    assert sample(metrics, "rlfleet_learner_step_seconds_count") == 0
