"""Chaos on a multi-turn job (real local Ray, vLLM generators, 2 environment actors): an
environment actor SIGKILLed while its trajectories are mid-way, and environment steps that hang.
The job completes and every trajectory id is trained exactly once; the killed actor's
trajectories started again from turn 0, the hung ones ended at their deadline."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
import ray
from support.job_configs import read_stats, small_job

from rlfleet.job.loop import TrainingJob

ITERATIONS = 3


@pytest.fixture(autouse=True)
def short_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))


@pytest.mark.slow
def test_a_killed_env_actor_and_hung_steps_lose_no_trajectory(
    ray_local, tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = small_job(
        tiny_model_dir,
        tmp_path / "run",
        env={
            "environment": "support.envs:CountingEnv",
            "kwargs": {"sleep_s": 0.3, "hang_every": 5},
            "num_actors": 2,
            "num_cpus": 0.25,
            "max_total_tokens": 40,
            "step_timeout_s": 2.0,
        },
        generators={"max_new_tokens": 6},
        iterations=ITERATIONS,
    )
    killed = []

    def kill_env_actor(kind: str, iteration: int, actors: list) -> None:
        if kind == "generator" and iteration == 2:  # a batch's trajectories are starting
            pid = ray.get(job.envs.actors[1].pid.remote())
            timer = threading.Timer(0.8, os.kill, (pid, signal.SIGKILL))
            timer.start()
            killed.append(pid)

    job = TrainingJob(config, on_dispatch=kill_env_actor)
    trained = []
    score = job.score
    job.score = lambda rollouts: trained.append(score(rollouts)) or trained[-1]
    try:
        job.train()
        assert killed and ray.get(job.envs.actors[1].pid.remote()) != killed[0]
    finally:
        job.shutdown()

    ids = [rid for batch in trained for rid in batch.column("rollout_id").to_pylist()]
    assert sorted(ids) == list(range(ITERATIONS * 8))  # each trajectory once, none lost
    stats = read_stats(tmp_path / "run")
    assert [line["iteration"] for line in stats] == list(range(1, ITERATIONS + 1))
    assert sum(line["env/restarts"] for line in stats) > 0  # they began again at turn 0
    assert sum(line["env/finished_env_timeout"] for line in stats) > 0
    for batch in trained:
        for row in batch.to_pylist():
            assert row["response_ids"] and len(row["loss_mask"]) == len(row["response_ids"])
