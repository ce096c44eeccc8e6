"""Running ``rlfleet train`` again continues the job from the latest committed checkpoint under
``checkpoint.uri`` without flags, refuses another job's checkpoint before Ray starts (exit 2),
says a finished job is complete (exit 0), and ``checkpoint.resume: never`` opts out. The
checkpoints here are committed manifests over placeholder files: only their identity and step
are read before the actors start."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from placeholder_checkpoints import commit_placeholder
from support.job_configs import small_job, write_config

from rlfleet.checkpoint.commit import CheckpointError, CheckpointIdentity, step_dir_name
from rlfleet.common.config import JobConfig
from rlfleet.job import train
from rlfleet.job.train import ResumePoint, find_resume_point


def job_with_checkpoints(model_dir: Path, tmp_path: Path, **fields: Any) -> JobConfig:
    checkpoint = {"uri": str(tmp_path / "checkpoints"), **fields.pop("checkpoint", {})}
    return small_job(model_dir, tmp_path / "run", iterations=4, checkpoint=checkpoint, **fields)


def test_the_latest_committed_checkpoint_of_the_job_is_where_it_continues(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = job_with_checkpoints(tiny_model_dir, tmp_path)
    uri = tmp_path / "checkpoints"
    assert find_resume_point(config, None) is None  # nothing saved yet: from the model
    identity = CheckpointIdentity.of_job(config)
    commit_placeholder(uri, 1, identity)
    step_2 = commit_placeholder(uri, 2, identity)
    (uri / step_dir_name(3)).mkdir()  # a save that never committed

    assert find_resume_point(config, None) == ResumePoint(step_2, 2)
    assert find_resume_point(config, "latest") == ResumePoint(step_2, 2)
    step_1 = f"{uri}/{step_dir_name(1)}"
    assert find_resume_point(config, step_1) == ResumePoint(step_1, 1)
    never = config.model_copy(
        update={"checkpoint": config.checkpoint.model_copy(update={"resume": "never"})}
    )
    assert find_resume_point(never, None) is None
    assert find_resume_point(never, "latest") == ResumePoint(step_2, 2)  # named: resumed
    with pytest.raises(CheckpointError, match="is not a committed checkpoint"):
        find_resume_point(config, f"{uri}/{step_dir_name(3)}")


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Records the calls that would start Ray and train (``init_ray``, ``run_job`` with its
    resume point) instead of making them: these tests are about what the driver decides before
    either (the real resume runs in tests/checkpoint/test_resume.py)."""
    calls: list[tuple] = []

    def init_ray(config: JobConfig) -> None:
        calls.append(("init_ray",))

    def run_job(config: JobConfig, resume_from: str | None = None, **kwargs: Any):
        calls.append(("run_job", resume_from))
        from rlfleet.job.loop import JobResult

        line = {"iteration": config.iterations, "samples": 8, "reward_mean": 0.5}
        return JobResult([line], [], 0, 0)

    monkeypatch.setattr(train, "init_ray", init_ray)
    monkeypatch.setattr(train, "run_job", run_job)
    return calls


def rlfleet_train(config: JobConfig, tmp_path: Path, *args: str) -> int:
    from rlfleet.cli import main

    return main(["train", "--config", str(write_config(tmp_path / "job.yaml", config)), *args])


def test_the_same_command_again_resumes_without_flags_and_says_so(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, no_ray: list[tuple]
) -> None:
    config = job_with_checkpoints(tiny_model_dir, tmp_path)
    step_2 = commit_placeholder(tmp_path / "checkpoints", 2, CheckpointIdentity.of_job(config))

    assert rlfleet_train(config, tmp_path) == 0
    assert no_ray == [("init_ray",), ("run_job", step_2)]
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"resuming job 'rlfleet' from checkpoint {step_2} (iteration 2 of 4)"


def test_opting_out_starts_from_the_model(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, no_ray: list[tuple]
) -> None:
    config = job_with_checkpoints(tiny_model_dir, tmp_path, checkpoint={"resume": "never"})
    commit_placeholder(tmp_path / "checkpoints", 2, CheckpointIdentity.of_job(config))

    assert rlfleet_train(config, tmp_path) == 0
    assert no_ray == [("init_ray",), ("run_job", None)]
    assert "resuming" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"name": "other-job"},
            r"was written by job 'rlfleet', this job is 'other-job'; point checkpoint\.uri "
            r"elsewhere or set name: rlfleet$",
        ),
        (
            {"algorithm": "grpo"},
            r"was written by a ppo job, this job runs grpo; point checkpoint\.uri elsewhere or "
            r"set algorithm: ppo$",
        ),
        (
            {"lora": {"r": 4}},
            r"holds the whole model, this job trains LoRA adapters; point checkpoint\.uri "
            r"elsewhere or set lora as that job did$",
        ),
    ],
)
def test_another_jobs_checkpoint_is_refused_with_one_line_and_exit_2_before_ray_starts(
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    no_ray: list[tuple],
    change: dict[str, str],
    message: str,
) -> None:
    ours = job_with_checkpoints(tiny_model_dir, tmp_path)
    step_2 = commit_placeholder(tmp_path / "checkpoints", 2, CheckpointIdentity.of_job(ours))
    theirs = job_with_checkpoints(tiny_model_dir, tmp_path, **change)

    assert rlfleet_train(theirs, tmp_path) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"rlfleet train: cannot resume: checkpoint {step_2} ")
    assert re.search(message, lines[0]), lines[0]
    assert no_ray == []


def test_resuming_from_latest_with_no_checkpoint_is_refused_before_ray_starts(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, no_ray: list[tuple]
) -> None:
    config = job_with_checkpoints(tiny_model_dir, tmp_path)
    assert rlfleet_train(config, tmp_path, "--resume-from", "latest") == 2
    assert capsys.readouterr().err.splitlines() == [
        f"rlfleet train: cannot resume: no committed checkpoint under {tmp_path}/checkpoints"
    ]
    assert no_ray == []


@pytest.mark.parametrize("args", [[], ["--resume-from", "latest"]], ids=["again", "latest"])
def test_a_finished_job_says_it_is_complete_and_exits_0_without_starting_ray(
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    no_ray: list[tuple],
    args: list[str],
) -> None:
    """Used to crash with IndexError on result.stats[-1]."""
    config = job_with_checkpoints(tiny_model_dir, tmp_path)
    step_4 = commit_placeholder(tmp_path / "checkpoints", 4, CheckpointIdentity.of_job(config))

    assert rlfleet_train(config, tmp_path, *args) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"job 'rlfleet' is complete: checkpoint {step_4} is at iteration 4 of 4; raise "
        "iterations to train further"
    ]
    assert no_ray == []


def test_run_job_has_nothing_to_do_for_a_finished_job(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Without Ray: a finished job starts no actor (TrainingJob would need a cluster)."""
    config = job_with_checkpoints(tiny_model_dir, tmp_path)
    commit_placeholder(tmp_path / "checkpoints", 4, CheckpointIdentity.of_job(config))
    result = train.run_job(config)
    assert result.stats == []
    assert train.summary(config, result) == "nothing to do: the job's 4 iterations are done"
