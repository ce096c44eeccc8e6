"""learner/metrics.py: TRL's PPO stats (or the critic-free trainer's) as gauges, step time, and
each weight publication."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlfleet.learner.metrics import PPO_STAT_GAUGES, LearnerMetrics, critic_free_stat_gauges

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


CRITIC_FREE_STATS = {
    "critic_free/loss": 0.25,
    "critic_free/entropy": 3.0,
    "critic_free/clip_ratio/region_mean": 0.125,
    "critic_free/reward/mean": 0.5,
    "critic_free/reward/std": 0.75,
    "critic_free/kl": 0.0625,
    "critic_free/kl_in_reward": 0.03125,
}


def test_critic_free_stats_set_the_shared_gauges_and_leave_the_ppo_only_ones() -> None:
    metrics = LearnerMetrics("demo", 0)
    gauges = critic_free_stat_gauges(beta=0.04, kl_coef=0.0)
    metrics.record_step(CRITIC_FREE_STATS, seconds=1.0, iteration=3, stat_gauges=gauges)
    assert sample(metrics, "rlfleet_learner_total_loss") == 0.25
    assert sample(metrics, "rlfleet_learner_entropy") == 3.0
    assert sample(metrics, "rlfleet_learner_clipfrac") == 0.125
    assert sample(metrics, "rlfleet_learner_mean_reward") == 0.5
    assert sample(metrics, "rlfleet_learner_std_reward") == 0.75
    assert sample(metrics, "rlfleet_learner_kl") == 0.0625
    assert sample(metrics, "rlfleet_learner_value_loss") == 0  # PPO only
    assert sample(metrics, "rlfleet_learner_iteration") == 3


def test_the_critic_free_kl_gauge_is_the_losss_else_the_rewards_else_none() -> None:
    kl_keys = {"critic_free/kl", "critic_free/kl_in_reward"}
    assert kl_keys & set(critic_free_stat_gauges(0.04, 0.01)) == {"critic_free/kl"}
    assert kl_keys & set(critic_free_stat_gauges(0.0, 0.01)) == {"critic_free/kl_in_reward"}
    assert kl_keys & set(critic_free_stat_gauges(0.0, 0.0)) == set()
    metrics = LearnerMetrics("demo", 0)
    without_kl = {k: v for k, v in CRITIC_FREE_STATS.items() if k not in kl_keys}
    metrics.record_step(without_kl, 1.0, 1, critic_free_stat_gauges(0.0, 0.0))
    with pytest.raises(ValueError, match="critic_free/kl_in_reward"):
        metrics.record_step(without_kl, 1.0, 2, critic_free_stat_gauges(0.0, 0.01))


def test_a_critic_free_step_that_trained_on_no_token_sets_only_the_reward_gauges() -> None:
    gauges = critic_free_stat_gauges(0.04, 0.0, trained=False)
    assert set(gauges) == {"critic_free/reward/mean", "critic_free/reward/std"}
    metrics = LearnerMetrics("demo", 0)
    metrics.record_step(
        {"critic_free/reward/mean": 0.5, "critic_free/reward/std": 0.0}, 1, 1, gauges
    )
    assert sample(metrics, "rlfleet_learner_mean_reward") == 0.5


def test_the_sampling_mismatch_is_a_gauge_whenever_a_step_reports_it() -> None:
    metrics = LearnerMetrics("demo", 0)
    metrics.record_step(PPO_STATS, seconds=1.0, iteration=1)
    assert sample(metrics, "rlfleet_learner_logprob_diff") == 0.0
    rollout = {
        "rollout/logprob_diff_mean": 0.03125,
        "rollout/tis_capped_fraction": 0.25,
        "rollout/truncated_fraction": 0.5,
    }
    metrics.record_step({**PPO_STATS, **rollout}, seconds=1.0, iteration=2)
    assert sample(metrics, "rlfleet_learner_logprob_diff") == 0.03125
    assert sample(metrics, "rlfleet_learner_tis_capped_fraction") == 0.25
    assert sample(metrics, "rlfleet_learner_truncated_fraction") == 0.5
