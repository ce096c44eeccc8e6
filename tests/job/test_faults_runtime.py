"""What ``rlfleet train`` says about trouble that its input does not decide alone: a disk that
fills up while the job runs (one line, even when error.log cannot be written either), a batch
that leaves actors idle, a batch whose groups all scored alike (a warning line each, once), and
a SIGTERM, after which the job's leases are gone."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from support.job_configs import small_job, write_config

from rlfleet.cli import main
from rlfleet.common.config import JobConfig
from rlfleet.common.trackers import Trackers
from rlfleet.job import train
from rlfleet.job.checks import check_config
from rlfleet.job.lease import LEASE_NAME
from rlfleet.job.reporting import ZERO_STD_GROUPS, JobReport


def test_a_full_disk_mid_run_is_one_line_even_when_error_log_cannot_be_written(
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """/dev/full answers every write with ENOSPC: the job's stats and its error.log both go
    there. Used to end in a chained ENOSPC traceback and an empty error.log."""
    out = tmp_path / "run"
    config = small_job(tiny_model_dir, out)

    def run_job(config: JobConfig, resume_from: str | None = None, **kwargs: Any):
        (out / "error.log").symlink_to("/dev/full")
        with open("/dev/full", "w") as stats:  # the job's own write on the full disk
            stats.write("{}\n")
            stats.flush()

    monkeypatch.setattr(train, "init_ray", lambda config: None)
    monkeypatch.setattr(train, "run_job", run_job)
    assert main(["train", "--config", str(write_config(tmp_path / "job.yaml", config))]) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "rlfleet train: OSError: [Errno 28] No space left on device; its traceback could not be "
        f"written to {out}/error.log ([Errno 28] No space left on device): rerun with --verbose "
        "to see it; fix the cause, then run the same command"
    ]
    assert not (out / "error.log").exists()  # no empty log left behind
    assert not (out / LEASE_NAME).exists()  # the lease is released all the same


@pytest.mark.parametrize(
    ("actors", "message"),
    [
        (
            {"generators": {"num_actors": 4}},
            "ppo.batch_size: 2 samples per iteration for generators.num_actors 4: 2 of them get "
            "no sample and stay idle; set generators.num_actors to at most 2 or raise "
            "ppo.batch_size",
        ),
        (
            {"reward": {"num_actors": 3}},
            "ppo.batch_size: 2 samples per iteration for reward.num_actors 3: 1 of them get no "
            "sample and stay idle; set reward.num_actors to at most 2 or raise ppo.batch_size",
        ),
    ],
    ids=["generators", "reward actors"],
)
def test_a_batch_smaller_than_a_pool_is_warned_of_at_start(
    tiny_model_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    actors: dict,
    message: str,
) -> None:
    config = small_job(
        tiny_model_dir, tmp_path / "run", ppo={"batch_size": 2, "mini_batch_size": 2}, **actors
    )
    with caplog.at_level(logging.WARNING):
        check_config(config)
    assert [record.getMessage() for record in caplog.records] == [message]


def test_a_batch_as_large_as_its_pools_has_no_warning(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = small_job(
        tiny_model_dir,
        tmp_path / "run",
        ppo={"batch_size": 2, "mini_batch_size": 2},
        generators={"num_actors": 2},
        reward={"num_actors": 2},
    )
    with caplog.at_level(logging.WARNING):
        check_config(config)
    assert caplog.records == []


def test_a_batch_of_zero_variance_groups_only_is_warned_of_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    report = JobReport(tmp_path, 0, chat=False, trackers=Trackers([]), grouped=True)
    with caplog.at_level(logging.WARNING):
        report.record({"iteration": 1, ZERO_STD_GROUPS: 0.5})
        report.record({"iteration": 2, ZERO_STD_GROUPS: 1.0})
        report.record({"iteration": 3, ZERO_STD_GROUPS: 1.0})
    assert [record.getMessage() for record in caplog.records] == [
        "iteration 2: critic_free/reward/frac_zero_std_groups is 1: every prompt's samples got "
        "the same reward, so every advantage is 0 and the batch gave no policy gradient; if "
        "that goes on, raise generators.temperature or generators.n_samples_per_prompt, or "
        "check the reward (said once)"
    ]


def test_the_zero_variance_warning_is_for_grouped_algorithms_only(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ppo = JobReport.open(small_job(tiny_model_dir, tmp_path / "ppo"))
    grpo = JobReport.open(small_job(tiny_model_dir, tmp_path / "grpo", algorithm="grpo"))
    assert (ppo.warn_zero_std, grpo.warn_zero_std) == (False, True)


def test_sigterm_while_the_job_runs_releases_its_leases(
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """A scheduler's SIGTERM stops the job cleanly (exit 143): the next run finds no lease."""
    out, checkpoints = tmp_path / "run", tmp_path / "checkpoints"
    config = small_job(tiny_model_dir, out, checkpoint={"uri": str(checkpoints)})
    held: list[bool] = []

    def run_job(config: JobConfig, resume_from: str | None = None, **kwargs: Any):
        held.append((out / LEASE_NAME).exists() and (checkpoints / LEASE_NAME).exists())
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal's handler raises here
        raise AssertionError("SIGTERM did not stop the job")

    monkeypatch.setattr(train, "init_ray", lambda config: None)
    monkeypatch.setattr(train, "run_job", run_job)
    assert main(["train", "--config", str(write_config(tmp_path / "job.yaml", config))]) == 143
    assert capsys.readouterr().err.splitlines()[-1].startswith("rlfleet train: stopped by SIGTERM")
    assert held == [True]
    assert not (out / LEASE_NAME).exists()
    assert not (checkpoints / LEASE_NAME).exists()
