"""Chaos on an asynchronous job (``mode: async``, ``max_policy_lag`` 2; real local Ray, vLLM
generators, the learner): a generator, a reward actor and the learner SIGKILLed with batches in
flight, then the driver killed and the job resumed. Every rollout id is trained once and none is
lost against an uninterrupted run (the ids 0..8 x iterations, in order)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.chaos import Killer, chaos_job
from support.job_configs import read_stats

from rlfleet.job.loop import TrainingJob

ITERATIONS = 12
DRIVER_KILL = 9
"""The iteration after which the driver dies (checkpoints every 3: 9 is committed or not)."""


class DriverKilled(Exception):
    pass


@pytest.fixture(autouse=True)
def short_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))


@pytest.mark.slow
def test_an_async_job_loses_no_rollout_through_actor_kills_and_a_driver_kill(
    ray_local, tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = chaos_job(
        tiny_model_dir,
        tmp_path / "run",
        tmp_path / "checkpoints",
        iterations=ITERATIONS,
        mode="async",
        max_policy_lag=2,
        generators={"num_actors": 2, "engine": "vllm", "max_new_tokens": 8},
    )
    killer = Killer(
        {("generator", 3): "generator", ("reward", 5): "reward", ("reward", 7): "learner"}
    )
    job = TrainingJob(config, on_dispatch=killer)
    killer.job = job
    record = job.report.record

    def driver_dies(stats, *args, **kwargs):
        record(stats, *args, **kwargs)
        if stats["iteration"] == DRIVER_KILL:
            raise DriverKilled

    job.report.record = driver_dies
    try:
        with pytest.raises(DriverKilled):
            job.train()
    finally:
        job.shutdown()  # what is left of the first driver goes
    assert [victim for victim, _ in killer.killed] == ["generator", "reward", "learner"]

    resumed = TrainingJob(config)
    resumed.resume(config.checkpoint.uri)
    try:
        result = resumed.train()
    finally:
        resumed.shutdown()

    stats = read_stats(tmp_path / "run")  # the resumed job dropped the lines after its checkpoint
    assert [line["iteration"] for line in stats] == list(range(1, ITERATIONS + 1))
    ranges = [line["rollout_ids"] for line in stats]
    assert ranges == [[8 * i, 8 * i + 7] for i in range(ITERATIONS)]  # each id once, none lost
    assert result.consumed_rollout_ids == list(range(8 * ITERATIONS))  # the checkpoint's too
    for line in stats:
        lag = line["iteration"] - 1 - min(line["sampled_with_versions"])
        assert 0 <= lag <= 2
