"""Chaos on a real job (local Ray, HF-engine generators, the sentiment reward, a real learner):
a generator killed every few iterations, a reward actor now and then, and the learner once after
a checkpoint exists, each with SIGKILL. The job completes and stats.jsonl holds every iteration
and every rollout id exactly once. bench/chaos.py runs the same job with kills at random moments,
the learner's mid weight-sync too."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.chaos import ITERATIONS, Killer, chaos_job, trained_ids
from support.job_configs import read_stats

from rlfleet.job.loop import TrainingJob

GENERATOR_KILLS = {3, 8, 13, 18, 23, 28}
"""Iterations whose batch a generator dies sampling (generator ``iteration % 2``)."""
REWARD_KILLS = {10, 20}
"""Iterations whose rollouts a reward actor dies scoring (reward actor ``iteration % 2``)."""
LEARNER_KILL = 17
"""The iteration whose rollouts are being scored when learner rank 0 is killed: checkpoints 12
and 15 exist (15 may still be committing), iterations 16 and 17 are trained again."""


@pytest.fixture(autouse=True)
def short_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))


@pytest.mark.slow
def test_a_job_survives_dying_generators_reward_actors_and_learner(
    ray_local, tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = chaos_job(tiny_model_dir, tmp_path / "run", tmp_path / "checkpoints")
    plan = {
        **{("generator", i): "generator" for i in GENERATOR_KILLS},
        **{("reward", i): "reward" for i in REWARD_KILLS},
        ("reward", LEARNER_KILL - 1): "learner",
    }
    killer = Killer(plan)
    job = TrainingJob(config, on_dispatch=killer)
    killer.job = job
    try:
        result = job.train()
    finally:
        job.shutdown()

    assert killer.plan == {}
    assert sorted(killer.killed) == sorted(
        [("generator", i + 1) for i in GENERATOR_KILLS]
        + [("reward", i + 1) for i in REWARD_KILLS]
        + [("learner", LEARNER_KILL)]
    )
    stats = read_stats(tmp_path / "run")
    assert [line["iteration"] for line in stats] == list(range(1, ITERATIONS + 1))
    trained = trained_ids(stats)
    assert trained == list(range(8 * ITERATIONS))
    assert [line["samples"] for line in stats] == [8] * ITERATIONS
    assert result.consumed_rollout_ids == list(range(8 * ITERATIONS))
    assert (result.learner_restarts, result.reward_restarts) == (1, len(REWARD_KILLS))
    assert result.generator_restarts == len(GENERATOR_KILLS)
    restarts = [line["learner_restarts"] for line in stats]
    # restored from checkpoint 12 or 15 (whichever was committed), not from the model
    assert restarts[:12] == [0] * 12 and restarts[LEARNER_KILL - 1 :] == [1] * 14
    assert [line["sampled_with_versions"] for line in stats] == [[i] for i in range(ITERATIONS)]
