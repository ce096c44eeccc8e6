"""Weight sync from the driver's side: when it is needed, and every generator holding the
published version afterwards (a restarted one included)."""

from __future__ import annotations

import pyarrow as pa
import pytest
import ray
from driver_fakes import LEARNER_STATS, FakeGenerator, FakeLearner, prompts

from rlfleet.common.config import WeightSyncConfig
from rlfleet.common.schema import with_columns
from rlfleet.common.transport import CollectiveError, WeightLoadError
from rlfleet.job.pool import ActorPool, split_batch
from rlfleet.job.sync import Outcome, WeightSync, learner_outcome, needs_sync
from rlfleet.learner.rank_group import ActorWaitError, LearnerGroup


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
    sync = WeightSync(LearnerGroup([learner], timeout_s=30))
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
        WeightSync(LearnerGroup([learner], timeout_s=30)).publish(pool)


def collective_sync() -> WeightSync:
    return WeightSync(None, WeightSyncConfig(transport="collective", timeout_s=7), backend="gloo")


def test_a_try_is_blamed_on_generators_that_died_or_did_not_answer_not_on_their_peers() -> None:
    died = Outcome(done=True, error=ray.exceptions.RayActorError())
    peer = Outcome(done=True, error=CollectiveError("connection closed by peer"))
    failure = collective_sync()._judge(
        peer, Outcome(done=True, result=3), died, Outcome(), peer, doing="syncing weights"
    )
    assert failure.blamed == {
        1: "died while syncing weights",
        2: "did not answer within weight_sync.timeout_s (7 s) while syncing weights",
    }
    assert len(failure.errors) == 3


def test_a_generator_failing_alone_is_blamed_and_a_failure_nobody_caused_is_tried_again() -> None:
    sync = collective_sync()
    ok, broken = Outcome(done=True, result=1), Outcome(done=True, error=CollectiveError("reset"))
    alone = sync._judge(ok, ok, broken, doing="syncing weights")
    assert alone.blamed == {1: "failed syncing weights: CollectiveError: reset"}
    everyone = sync._judge(broken, broken, broken, doing="syncing weights")
    assert everyone.blamed == {}  # no restart: the group is formed again and the sync retried
    assert sync._judge(ok, ok, ok, doing="syncing weights") is None


def test_an_engine_load_error_or_a_learner_failing_on_its_own_stops_the_sync() -> None:
    sync = collective_sync()
    ok = Outcome(done=True, result=1)
    load_error = Outcome(done=True, error=WeightLoadError("generator 0: its engine ..."))
    with pytest.raises(RuntimeError, match="weight sync: generator 0: its engine"):
        sync._judge(ok, load_error, doing="syncing weights")
    learner_bug = Outcome(done=True, error=TypeError("weights['x'] is a list"))
    with pytest.raises(RuntimeError, match="the learner failed syncing weights"):
        sync._judge(learner_bug, ok, doing="syncing weights")
    with pytest.raises(RuntimeError, match="learner did not finish joining the weight group"):
        sync._judge(Outcome(), ok, doing="joining the weight group")


def test_a_learner_that_died_or_stalled_mid_sync_is_left_to_the_learner_restart() -> None:
    sync = collective_sync()
    ok = Outcome(done=True, result=1)
    died = Outcome(done=True, error=ray.exceptions.RayActorError())
    with pytest.raises(ActorWaitError, match="a learner rank died syncing weights"):
        sync._judge(died, ok, doing="syncing weights")
    with pytest.raises(ActorWaitError, match="learner did not finish syncing weights"):
        sync._judge(Outcome(), ok, doing="syncing weights")
    with pytest.raises(RuntimeError) as bug:
        sync._judge(Outcome(done=True, error=TypeError("x")), ok, doing="syncing weights")
    assert not isinstance(bug.value, ActorWaitError)  # a learner's own bug is not restarted


def test_the_learner_outcome_is_its_first_failing_rank_else_rank_0() -> None:
    failed = Outcome(done=True, error=CollectiveError("x"))
    assert learner_outcome([Outcome(done=True, result=1), failed]) is failed
    assert learner_outcome([Outcome(done=True, result=1), Outcome()]).done is False
    assert learner_outcome([Outcome(done=True, result=1), Outcome(done=True)]).result == 1


def test_weights_lost_with_their_owner_are_the_learners_failure_not_the_engines() -> None:
    """A generator's ``WeightLoadError`` around ``OwnerDiedError``: learner rank 0, the
    published object's owner, died; the job restarts the learner (job/loop.py)."""
    sync = collective_sync()
    ok = Outcome(done=True, result=1)
    lost = Outcome(
        done=True,
        error=WeightLoadError(
            "generator 1: its vllm engine could not load the published weights: "
            "OwnerDiedError: Failed to retrieve object 00ff"
        ),
    )
    with pytest.raises(ActorWaitError) as failure:
        sync._judge(ok, ok, lost, doing="syncing weights")
    assert failure.value.learner_failed
    assert str(failure.value) == (
        "weight sync: the published weights were lost syncing weights: their owner, learner "
        "rank 0, died (WeightLoadError: generator 1: its vllm engine could not load the "
        "published weights: OwnerDiedError: Failed to retrieve object 00ff)"
    )
