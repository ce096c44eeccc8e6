"""learner.batches.staleness_stats: the policy-version lag of a batch for the learner."""

from __future__ import annotations

import pytest
from support.batches import scored_batch

from rlfleet.learner.batches import staleness_stats


def test_the_lags_are_counted_per_version_behind_with_the_rest_together() -> None:
    batch = scored_batch(range(7), policy_version=[10, 10, 9, 8, 8, 4, 1])
    stats = staleness_stats(batch, learner_version=10)
    assert stats == {
        "rollout/staleness_mean": pytest.approx((0 + 0 + 1 + 2 + 2 + 6 + 9) / 7),
        "rollout/staleness_max": 9.0,
        "rollout/staleness_0": 2.0,
        "rollout/staleness_1": 1.0,
        "rollout/staleness_2": 2.0,
        "rollout/staleness_3": 0.0,
        "rollout/staleness_4plus": 2.0,
    }


def test_an_on_policy_batch_has_every_rollout_at_lag_zero() -> None:
    stats = staleness_stats(scored_batch(range(3), policy_version=5), learner_version=5)
    assert stats["rollout/staleness_0"] == 3.0
    assert stats["rollout/staleness_max"] == stats["rollout/staleness_mean"] == 0.0


def test_a_rollout_without_a_version_is_refused() -> None:
    with pytest.raises(ValueError, match="no policy_version"):
        staleness_stats(scored_batch(range(2), policy_version=[1, None]), learner_version=2)
