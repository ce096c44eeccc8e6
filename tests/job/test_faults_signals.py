"""SIGTERM (a scheduler stopping the job) and Ctrl-C while ``rlfleet train`` runs (fake actors on
a real local Ray): one line saying how to continue, exit status 128 + the signal, the actors
stopped, the Prometheus discovery file removed, and stats.jsonl holding every iteration done."""

from __future__ import annotations

import functools
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import ray
from driver_fakes import fake_factories
from support.job_configs import read_stats, small_job, write_config

from rlfleet.cli import main
from rlfleet.common.config import JobConfig
from rlfleet.job import train
from rlfleet.job.loop import TrainingJob


@pytest.mark.parametrize(
    ("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"]
)
def test_a_signal_stops_the_job_cleanly_with_one_line(
    ray_local,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    signum: signal.Signals,
    status: int,
) -> None:
    out, sd_dir = tmp_path / "run", tmp_path / "sd"
    config = small_job(tiny_model_dir, out, iterations=50, metrics={"file_sd_dir": str(sd_dir)})
    jobs: list[TrainingJob] = []
    discovery_files: list[list[str]] = []

    def fake_job(config: JobConfig, rows: list[dict[str, Any]], on_dispatch=None) -> TrainingJob:
        jobs.append(TrainingJob(config, rows, on_dispatch, fake_factories(config)))
        return jobs[-1]

    def signal_at_iteration_3(kind: str, iteration: int, actors: list) -> None:
        if (kind, iteration) == ("reward", 2):
            discovery_files.append(sorted(path.name for path in sd_dir.iterdir()))
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(train, "TrainingJob", fake_job)
    monkeypatch.setattr(train, "init_ray", lambda config: None)
    monkeypatch.setattr(
        train, "run_job", functools.partial(train.run_job, on_dispatch=signal_at_iteration_3)
    )
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    assert main(["train", "--config", str(write_config(tmp_path / "job.yaml", config))]) == status
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"rlfleet train: stopped by {signum.name}; run the same command"
    )
    assert discovery_files == [[f"{config.name}.json"]]
    assert list(sd_dir.iterdir()) == []
    assert [line["iteration"] for line in read_stats(out)] == [1, 2]
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(jobs[0].generators.actors[0].ready.remote(), timeout=30)
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
