"""A learner that dies mid-job, with fake actors on a real local Ray: the job restarts it from the
newest committed checkpoint of the run (or from the model at iteration 0), samples the batches
after it again with the same rollout ids, and stats.jsonl ends with every iteration and every
rollout id once; a limit ends a learner that keeps failing. The stats line of an iteration is on
disk before its checkpoint is saved."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import ray
from driver_fakes import fake_factories
from placeholder_checkpoints import commit_placeholder
from support.job_configs import PROMPTS, quiet_job, read_stats, small_job

from rlfleet.checkpoint.commit import step_dir_name
from rlfleet.common.config import CheckpointConfig, JobConfig, MetricsConfig, PPOConfig
from rlfleet.job.data import read_prompt_rows
from rlfleet.job.loop import JobResult, LearnerRestartsExhausted, TrainingJob
from rlfleet.learner.actor import LearnerActor, LearnerSettings

ROWS = read_prompt_rows(PROMPTS, "prompt")


def kill_learner_rank(
    at: set[tuple[str, int]],
    rank: int = 0,
    before: Callable[[TrainingJob], None] | None = None,
    every_time: bool = False,
) -> tuple[Callable[[str, int, list], None], list[int], list[TrainingJob]]:
    """A dispatch hook that kills learner rank ``rank`` when a batch of (kind, iteration) in
    ``at`` goes out, the first time (or ``every_time``); ``before`` runs first. Also returns
    the iterations it killed at, and a list to put the job in."""
    killed: list[int] = []
    job: list[TrainingJob] = []

    def hook(kind: str, iteration: int, actors: list) -> None:
        if (kind, iteration) in at:
            if before:
                before(job[0])
            ray.kill(job[0].learner.ranks[rank], no_restart=True)
            killed.append(iteration)
            if not every_time:
                at.remove((kind, iteration))

    return hook, killed, job


def train_killing(
    config: JobConfig, at: set[tuple[str, int]], **kill: Any
) -> tuple[JobResult, TrainingJob, list[int]]:
    hook, killed, holder = kill_learner_rank(at, **kill)
    job = TrainingJob(config, ROWS, hook, fake_factories(config))
    holder.append(job)
    try:
        return job.train(), job, killed
    finally:
        job.shutdown()


def learner_restarts_metric(job: TrainingJob) -> float | None:
    labels = {"job": job.config.name, "role": "job", "index": "0", "actor_role": "learner"}
    return job.metrics.registry.get_sample_value("rlfleet_job_actor_restarts_total", labels)


def assert_every_rollout_once(out: Path, result: JobResult, iterations: int) -> None:
    stats = read_stats(out)
    assert stats == result.stats
    assert [line["iteration"] for line in stats] == list(range(1, iterations + 1))
    assert [line["rollout_ids"] for line in stats] == [
        [8 * i, 8 * i + 7] for i in range(iterations)
    ]
    assert result.consumed_rollout_ids == list(range(8 * iterations))


@pytest.mark.parametrize(
    ("one_step_off", "ranks", "versions"),
    [
        (False, 1, [0, 1, 2, 3, 4, 5, 6]),
        # Batch 5 goes out again after the restore, sampled with the restored version 4.
        (True, 2, [0, 0, 1, 2, 4, 4, 5]),
    ],
    ids=["one-rank", "one-step-off-2-ranks"],
)
def test_a_dead_learner_rank_restarts_the_learner_from_the_newest_checkpoint(
    ray_local,
    tiny_model_dir: Path,
    tmp_path: Path,
    one_step_off: bool,
    ranks: int,
    versions: list[int],
) -> None:
    """Killed while batch 6 is scored (checkpoint 4 is the newest, line 5 written after it):
    the new learner restores step 4, batches 5 and 6 are sampled again with their ids, line 5 is
    written once, and the generators sample with the restored policy."""
    out = tmp_path / "run"
    config = quiet_job(
        tiny_model_dir,
        out,
        iterations=7,
        one_step_off=one_step_off,
        max_policy_lag=int(one_step_off),
        learner={"num_ranks": ranks},
        checkpoint={"uri": str(tmp_path / "checkpoints"), "every": 2},
    )
    result, job, killed = train_killing(config, {("reward", 5)}, rank=ranks - 1)

    assert killed == [5]
    assert_every_rollout_once(out, result, 7)
    assert result.learner_restarts == 1
    assert [line["learner_restarts"] for line in result.stats] == [0, 0, 0, 0, 1, 1, 1]
    assert [line["sampled_with_versions"] for line in result.stats] == [[v] for v in versions]
    assert learner_restarts_metric(job) == 1


def test_without_a_checkpoint_the_learner_restarts_from_the_model_at_iteration_0(
    ray_local, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    config = quiet_job(tiny_model_dir, out, iterations=3)
    assert config.checkpoint.uri is None
    result, job, killed = train_killing(config, {("reward", 2)})

    assert killed == [2]
    assert_every_rollout_once(out, result, 3)
    assert [line["learner_restarts"] for line in result.stats] == [1, 1, 1]
    assert [line["sampled_with_versions"] for line in result.stats] == [[0], [1], [2]]


def test_a_save_the_dead_learner_did_not_commit_is_passed_over(
    ray_local, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Checkpoint 4 is gone (as a save whose ranks died before the manifest): step 2 it is."""
    out, uri = tmp_path / "run", tmp_path / "checkpoints"
    config = quiet_job(tiny_model_dir, out, iterations=5, checkpoint={"uri": str(uri), "every": 2})

    def lose_checkpoint_4(job: TrainingJob) -> None:
        (uri / "step-00000004.json").unlink()

    result, _, _ = train_killing(config, {("reward", 4)}, before=lose_checkpoint_4)
    restored = [line["iteration"] for line in result.stats if line["learner_restarts"]]

    assert restored == [3, 4, 5]
    assert_every_rollout_once(out, result, 5)


def test_a_learner_that_keeps_failing_ends_the_job_at_the_limit(
    ray_local, tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = quiet_job(tiny_model_dir, tmp_path / "run", iterations=3, learner={"max_restarts": 1})
    with pytest.raises(LearnerRestartsExhausted) as error:
        train_killing(config, {("reward", 1)}, every_time=True)
    assert str(error.value).startswith(
        "the learner failed after 1 restarts (learner.max_restarts 1): learner rank 0 died in "
        "step: "
    )
    assert "\n" not in str(error.value)


class DriverDied(Exception):
    """Stands for the driver's process dying."""


def test_the_stats_line_is_on_disk_before_its_checkpoint_so_a_resume_leaves_no_gap(
    ray_local, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The driver dies right after checkpoint 4 is saved: line 4 is already in stats.jsonl (it
    used to be written after the save, and a resume from step 4 lacked it)."""
    out, uri = tmp_path / "run", tmp_path / "checkpoints"
    config = quiet_job(tiny_model_dir, out, iterations=6, checkpoint={"uri": str(uri), "every": 2})
    job = TrainingJob(config, ROWS, None, fake_factories(config))
    save = job.save_checkpoint

    def save_then_die(cursor: dict[str, Any]) -> None:
        save(cursor)
        if job.iteration == 4:
            raise DriverDied

    job.save_checkpoint = save_then_die
    try:
        with pytest.raises(DriverDied):
            job.train()
    finally:
        job.shutdown()
    assert [line["iteration"] for line in read_stats(out)] == [1, 2, 3, 4]

    resumed = TrainingJob(config, ROWS, None, fake_factories(config))
    try:
        resumed.resume(str(uri))
        result = resumed.train()
    finally:
        resumed.shutdown()
    assert [line["iteration"] for line in result.stats] == [5, 6]
    stats = read_stats(out)
    assert [line["iteration"] for line in stats] == list(range(1, 7))
    assert [line["rollout_ids"] for line in stats] == [[8 * i, 8 * i + 7] for i in range(6)]


def test_a_resume_names_the_stats_lines_that_are_missing(
    ray_local, tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out, uri = tmp_path / "run", tmp_path / "checkpoints"
    config = quiet_job(tiny_model_dir, out, iterations=2, checkpoint={"uri": str(uri), "every": 1})
    job = TrainingJob(config, ROWS, None, fake_factories(config))
    try:
        job.train()
    finally:
        job.shutdown()
    (out / "stats.jsonl").unlink()  # an output_dir that did not survive the driver's restart

    resumed = TrainingJob(
        config.model_copy(update={"iterations": 3}), ROWS, None, fake_factories(config)
    )
    try:
        with caplog.at_level(logging.WARNING, logger="rlfleet.job.loop"):
            resumed.resume(str(uri))
        resumed.train()
    finally:
        resumed.shutdown()
    assert "holds the lines of iterations [], not 1..2 of checkpoint" in caplog.text
    assert [json.loads(line)["iteration"] for line in (out / "stats.jsonl").open()] == [3]


def test_a_restarted_learner_takes_the_newest_save_that_was_committed(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Step 3 died before its manifest (debris), step 4 was never written: step 2 it is."""
    learner = LearnerActor(
        LearnerSettings(
            str(tiny_model_dir),
            "ppo",
            PPOConfig(batch_size=8, mini_batch_size=4),
            seed=0,
            metrics=MetricsConfig(enabled=False),
        )
    )
    uri = tmp_path / "checkpoints"
    config = CheckpointConfig(uri=str(uri))
    step_2 = commit_placeholder(uri, 2, learner.identity)
    (uri / step_dir_name(3) / "policy").mkdir(parents=True)
    uris = [step_2, f"{uri}/{step_dir_name(3)}", f"{uri}/{step_dir_name(4)}"]

    assert learner.newest_committed(uris, config) == step_2
    assert learner.newest_committed(uris[1:], config) is None


@pytest.mark.slow
def test_a_killed_rank_of_a_real_two_rank_learner_is_restarted_from_its_checkpoint(
    ray_local, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two FSDP2 ranks over gloo; rank 1 is killed while batch 4 is scored. New ranks (a new
    rendezvous in the same placement group) restore step 2 and train 3 and 4 again."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    out = tmp_path / "run"
    config = small_job(
        tiny_model_dir,
        out,
        iterations=4,
        generators={"engine": "hf"},
        learner={"num_ranks": 2, "num_cpus": 0.5, "timeout_s": 120},
        checkpoint={"uri": str(tmp_path / "checkpoints"), "every": 2},
        metrics={"enabled": False},
    )
    hook, killed, holder = kill_learner_rank({("reward", 3)}, rank=1)
    job = TrainingJob(config, on_dispatch=hook)
    holder.append(job)
    try:
        result = job.train()
    finally:
        job.shutdown()

    assert killed == [3]
    assert_every_rollout_once(out, result, 4)
    assert result.learner_restarts == 1
    assert [line["learner_restarts"] for line in result.stats] == [0, 0, 1, 1]
    assert [line["sampled_with_versions"] for line in result.stats] == [[0], [1], [2], [3]]
