"""A learner rank that dies while the job starts or resumes (fake actors, real local Ray): the
job restarts the learner as it does during training, counted against ``learner.max_restarts``,
and trains every rollout once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import ray
from driver_fakes import fake_factories
from support.job_configs import PROMPTS, quiet_job, read_stats

from rlfleet.common.config import JobConfig
from rlfleet.job.data import read_prompt_rows
from rlfleet.job.loop import LearnerRestartsExhausted, TrainingJob
from rlfleet.job.roles import ActorFactories
from rlfleet.learner.rank_group import LearnerGroup

ROWS = read_prompt_rows(PROMPTS, "prompt")


def learners_dying_at_start(config: JobConfig, deaths: int) -> ActorFactories:
    """The fakes, but the first ``deaths`` learners started lose rank 0 before it is ready."""
    factories = fake_factories(config)
    started: list[LearnerGroup] = []

    def learner() -> LearnerGroup:
        group = factories.learner()
        started.append(group)
        if len(started) <= deaths:
            ray.kill(group.ranks[0], no_restart=True)
        return group

    return dataclasses.replace(factories, learner=learner)


def test_a_learner_rank_that_dies_at_start_up_is_restarted(
    ray_local, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    config = quiet_job(tiny_model_dir, out, iterations=2)
    job = TrainingJob(config, ROWS, None, learners_dying_at_start(config, deaths=1))
    try:
        result = job.train()
    finally:
        job.shutdown()
    assert result.learner_restarts == 1
    assert [line["learner_restarts"] for line in read_stats(out)] == [1, 1]
    assert result.consumed_rollout_ids == list(range(16))


def test_a_learner_that_keeps_dying_at_start_up_ends_at_the_limit(
    ray_local, tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = quiet_job(tiny_model_dir, tmp_path / "run", learner={"max_restarts": 2})
    with pytest.raises(LearnerRestartsExhausted) as error:
        TrainingJob(config, ROWS, None, learners_dying_at_start(config, deaths=3))
    assert str(error.value).startswith(
        "the learner failed after 2 restarts (learner.max_restarts 2): learner rank 0 died at "
    )


def test_a_learner_rank_that_dies_while_loading_the_resumed_checkpoint_is_restarted(
    ray_local, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 0 dies in load_checkpoint: the new learner loads the same checkpoint (not the
    model), and the resumed run trains iterations 3 and 4 only."""
    out, uri = tmp_path / "run", tmp_path / "checkpoints"
    config = quiet_job(tiny_model_dir, out, iterations=2, checkpoint={"uri": str(uri), "every": 1})
    first = TrainingJob(config, ROWS, None, fake_factories(config))
    try:
        first.train()
    finally:
        first.shutdown()

    load = LearnerGroup.load_checkpoint
    killed: list[str] = []

    def dying_load(group: LearnerGroup, checkpoint: str, checkpoint_config) -> dict:
        if not killed:
            killed.append(checkpoint)
            ray.kill(group.ranks[0], no_restart=True)
        return load(group, checkpoint, checkpoint_config)

    monkeypatch.setattr(LearnerGroup, "load_checkpoint", dying_load)
    longer = config.model_copy(update={"iterations": 4})
    resumed = TrainingJob(longer, ROWS, None, fake_factories(longer))
    try:
        resumed.resume(str(uri))
        result = resumed.train()
    finally:
        resumed.shutdown()
    assert killed == [f"{uri}/step-00000002.json"]
    assert result.learner_restarts == 1
    assert [line["iteration"] for line in read_stats(out)] == [1, 2, 3, 4]
    assert [line["rollout_ids"] for line in result.stats] == [[16, 23], [24, 31]]
    assert result.consumed_rollout_ids == list(range(32))
