"""Weight sync from the driver's side: when it is needed, and every generator holding the
published version afterwards (a restarted one included)."""

from __future__ import annotations

import pyarrow as pa
import pytest
import ray
from driver_fakes import LEARNER_STATS, FakeGenerator, FakeLearner, prompts

from rlfleet.common.schema import with_columns
from rlfleet.learner.driver.pool import ActorPool, split_batch
from rlfleet.learner.driver.sync import WeightSync, needs_sync


@pytest.mark.parametrize(
    ("iteration", "version", "lag", "one_step_off", "expected"),
    [
        (0, 0, 0, False, False),  # the model directory's weights are version 0
        (1, 0, 0, False, True),  # on-policy: every step
        (1, 1, 0, False, False),
        (1, 0, 1, False, False),  # lag 1: every other step
        (2, 0, 1, False, True),
        (0, 0, 1, True, False),  # one-step-off: sampled now, trained on after the next step
        (1, 0, 1, True, True),
        (2, 1, 1, True, True),
        (2, 1, 2, True, False),
    ],
)
def test_needs_sync_when_the_next_rollouts_would_lag_more_than_allowed(
    iteration: int, version: int, lag: int, one_step_off: bool, expected: bool
) -> None:
    assert needs_sync(iteration, version, lag, one_step_off) is expected


def step(learner, batch: pa.RecordBatch) -> None:
    """One (fake) learner step on ``batch``, sampled with version 0."""
    scored = with_columns(
        batch,
        response_ids=[[1]] * batch.num_rows,
        policy_version=[0] * batch.num_rows,
        score=[0.0] * batch.num_rows,
    )
    ray.get(learner.step.remote(scored))


def generated_versions(pool: ActorPool) -> list[int]:
    results = pool.collect(pool.dispatch("generate", split_batch(prompts(4), 2)))
    return [v for result in results for v in result.column("policy_version").to_pylist()]


def test_publish_brings_every_generator_and_a_restarted_one_to_the_new_version(ray_local) -> None:
    learner = FakeLearner.remote("sync", 0, False, LEARNER_STATS)
    sync = WeightSync(learner)
    pool = ActorPool(
        "generator",
        lambda i: FakeGenerator.remote("sync", i, False),
        2,
        on_restart=sync.load_into_restarted,
    )
    pool.wait_ready()
    assert sync.version == 0
    step(learner, prompts(2))

    sync.publish(pool)

    assert sync.version == 1
    assert generated_versions(pool) == [1, 1, 1, 1]
    ray_local.kill(pool.actors[0], no_restart=True)
    assert generated_versions(pool) == [1, 1, 1, 1]
    assert pool.restarts == 1
    assert ray_local.get(learner.published_versions.remote()) == [1]


def test_a_generator_that_does_not_hold_the_published_version_fails_the_sync(ray_local) -> None:
    learner = FakeLearner.remote("sync", 0, False, LEARNER_STATS)
    step(learner, prompts(2))
    pool = ActorPool("generator", lambda i: FakeGenerator.remote("sync", i, False, stuck=0), 1)
    with pytest.raises(RuntimeError, match="generator 0 holds policy version 0, expected 1"):
        WeightSync(learner).publish(pool)
