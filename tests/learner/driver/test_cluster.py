"""Ray set-up: the CPUs a local instance needs for the job's actors."""

from __future__ import annotations

from pathlib import Path

from job_configs import small_job

from rlfleet.learner.driver.cluster import required_cpus


def test_required_cpus_add_up_every_actor(tmp_path: Path) -> None:
    config = small_job(
        tmp_path,
        tmp_path / "run",
        learner={"num_cpus": 2},
        generators={"num_actors": 3, "num_cpus": 1.5},
        reward={"num_actors": 2, "num_cpus": 0.25},
    )
    assert required_cpus(config) == 2 + 3 * 1.5 + 2 * 0.25
