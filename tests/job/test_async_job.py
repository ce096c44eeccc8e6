"""Asynchronous mode end to end (real local Ray, vLLM generators, reward actors, the learner):
the generators sample ``max_policy_lag`` batches ahead and load each new policy between two
engine steps; no sample lags more than ``max_policy_lag`` versions, every rollout id is trained
once, and a resumed job loses none."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.job_configs import read_stats, small_job

from rlfleet.job.loop import TrainingJob

LAG = 2
ITERATIONS = 5


@pytest.fixture(autouse=True)
def short_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))


def async_job(model_dir: Path, out: Path, **fields):
    return small_job(
        model_dir,
        out,
        algorithm="grpo",
        mode="async",
        max_policy_lag=LAG,
        generators={"max_new_tokens": 24, "num_actors": 2},
        reward={
            "function": "rlfleet.reward.functions:length_penalty",
            "kwargs": {"target": 0, "coef": 0.01},
        },
        iterations=ITERATIONS,
        **fields,
    )


def trained_batches(job: TrainingJob) -> list:
    trained = []
    score = job.score
    job.score = lambda rollouts: trained.append(score(rollouts)) or trained[-1]
    return trained


@pytest.mark.slow
def test_async_samples_ahead_within_the_lag_and_trains_every_id_once(
    ray_local, tiny_model_dir: Path, tmp_path: Path
) -> None:
    job = TrainingJob(async_job(tiny_model_dir, tmp_path / "run"))
    trained = trained_batches(job)
    try:
        job.train()
    finally:
        job.shutdown()
    ids = [rid for batch in trained for rid in batch.column("rollout_id").to_pylist()]
    assert sorted(ids) == list(range(ITERATIONS * 8))
    for iteration, batch in enumerate(trained):  # trained by the learner at version iteration
        for row in batch.to_pylist():
            versions = row["token_versions"]
            assert len(versions) == len(row["response_ids"])
            assert versions == sorted(versions)  # a request goes on under newer weights only
            assert iteration - LAG <= row["policy_version"] == versions[0] <= iteration
    stats = read_stats(tmp_path / "run")
    assert [line["iteration"] for line in stats] == list(range(1, ITERATIONS + 1))
    assert max(v for line in stats for v in line["sampled_with_versions"]) >= 1  # weights arrived


@pytest.mark.slow
def test_an_async_job_stopped_and_resumed_trains_the_ids_of_an_uninterrupted_run_once(
    ray_local, tiny_model_dir: Path, tmp_path: Path
) -> None:
    checkpoint = {"uri": str(tmp_path / "checkpoints"), "every": 2}
    config = async_job(tiny_model_dir, tmp_path / "run", checkpoint=checkpoint)
    job = TrainingJob(config)
    first = trained_batches(job)

    class DriverKilled(Exception):
        pass

    record = job.report.record

    def killed_after_iteration_3(stats, *args, **kwargs):
        record(stats, *args, **kwargs)
        if stats["iteration"] == 3:
            raise DriverKilled

    job.report.record = killed_after_iteration_3
    try:
        with pytest.raises(DriverKilled):
            job.train()
        job.learner.wait_for_checkpoint()
    finally:
        job.shutdown()

    resumed = TrainingJob(config)
    resumed.resume(str(tmp_path / "checkpoints"))
    second = trained_batches(resumed)
    try:
        resumed.train()
    finally:
        resumed.shutdown()
    kept = [b for b in first if max(b.column("rollout_id").to_pylist()) < 2 * 8]  # checkpoint 2
    ids = [rid for batch in kept + second for rid in batch.column("rollout_id").to_pylist()]
    assert sorted(ids) == list(range(ITERATIONS * 8))  # none lost, none twice
