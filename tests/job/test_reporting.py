"""A job's report: stats.jsonl, samples.jsonl (which rollouts, what each line holds), dropping
lines on resume, and the TensorBoard and W&B trackers getting the stats lines' numbers, read back
from their files. The last test runs a job with fake actors on a real local Ray."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from driver_fakes import fake_factories
from pydantic import ValidationError
from support.batches import scored_batch
from support.job_configs import PROMPTS, read_stats, small_job
from support.tensorboard_files import tensorboard_scalars
from support.wandb_files import finished_run_dir, isolate_wandb, wandb_history

from rlfleet.common.trackers import TensorBoardTracker, Trackers
from rlfleet.job.checks import ConfigError
from rlfleet.job.data import read_prompt_rows
from rlfleet.job.loop import TrainingJob
from rlfleet.job.reporting import JobReport, tracker_scalars

ROWS = read_prompt_rows(PROMPTS, "prompt")


def numbered_batch(rollout_ids: list[int], chat: bool = False) -> pa.RecordBatch:
    """Rollouts as the reward actors return them; rollout id ``i`` has reward ``i / 10``, a
    component ``length`` of ``i`` and policy version ``i // 4``."""
    messages = [{"role": "user", "content": f"question {i}"} for i in rollout_ids]
    return scored_batch(
        rollout_ids,
        [i / 10 for i in rollout_ids],
        policy_version=[i // 4 for i in rollout_ids],
        prompts=[f"prompt {i}" for i in rollout_ids],
        responses=[f"response {i}" for i in rollout_ids],
        metadata=[{"messages": [m]} if chat else {} for m in messages],
        score_components=[[("length", float(i))] for i in rollout_ids],
    )


def stats_line(iteration: int, reward: float = 0.5) -> dict[str, Any]:
    return {
        "iteration": iteration,
        "samples": 8,
        "rollout_ids": [8 * (iteration - 1), 8 * iteration - 1],
        "sampled_with_versions": [iteration - 1],
        "reward_mean": reward,
        "objective/kl": 0.25,
        "eval/reward_mean": 0.75,
    }


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def report(out: Path, samples: int = 3, chat: bool = False, trackers: list | None = None):
    return JobReport(out, samples, chat, Trackers(trackers or []))


def test_samples_are_the_lowest_rollout_ids_whatever_the_batch_order(tmp_path: Path):
    job_report = report(tmp_path)
    job_report.record(stats_line(1), numbered_batch([5, 2, 7, 0, 3, 1, 6, 4]))
    job_report.record(stats_line(2), numbered_batch([12, 9, 8, 15, 10, 11, 14, 13]))

    samples = read_lines(job_report.samples_path)
    assert [(s["iteration"], s["rollout_id"]) for s in samples] == [
        (1, 0),
        (1, 1),
        (1, 2),
        (2, 8),
        (2, 9),
        (2, 10),
    ]
    assert samples[4] == {
        "iteration": 2,
        "rollout_id": 9,
        "policy_version": 2,
        "prompt": "prompt 9",
        "response": "response 9",
        "reward": pytest.approx(0.9),
        "reward_components": {"length": 9.0},
    }
    assert read_lines(job_report.stats_path) == [stats_line(1), stats_line(2)]
    assert job_report.stats_lines == [stats_line(1), stats_line(2)]


def test_a_chat_sample_has_the_messages_beside_the_rendered_prompt(tmp_path: Path):
    job_report = report(tmp_path, samples=1, chat=True)
    job_report.record(stats_line(1), numbered_batch([0, 1], chat=True))
    [sample] = read_lines(job_report.samples_path)
    assert sample["prompt"] == "prompt 0"
    assert sample["messages"] == [{"role": "user", "content": "question 0"}]


def test_no_samples_with_a_count_of_0_or_without_rollouts(tmp_path: Path):
    job_report = report(tmp_path, samples=0)
    job_report.record(stats_line(1), numbered_batch([0, 1]))
    job_report.record(stats_line(2))
    assert not job_report.samples_path.exists()
    assert [line["iteration"] for line in read_lines(job_report.stats_path)] == [1, 2]


def test_a_durable_record_syncs_both_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    synced: list[str] = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")))
    job_report = report(tmp_path)
    job_report.record(stats_line(1), numbered_batch([0, 1]))
    assert synced == []
    job_report.record(stats_line(2), numbered_batch([8, 9]), durable=True)
    assert synced == [str(job_report.samples_path), str(job_report.stats_path)]


def test_keep_through_drops_the_later_lines_of_both_files(tmp_path: Path):
    job_report = report(tmp_path, samples=2)
    for iteration in (1, 2, 3):
        job_report.record(stats_line(iteration), numbered_batch([8 * iteration, 8 * iteration + 1]))

    resumed = report(tmp_path, samples=2)
    assert resumed.keep_through(1) == [1]
    assert [line["iteration"] for line in read_lines(resumed.samples_path)] == [1, 1]
    resumed.record(stats_line(2), numbered_batch([8, 9]))
    assert [line["iteration"] for line in read_lines(resumed.stats_path)] == [1, 2]
    assert resumed.stats_lines == [stats_line(2)]

    resumed.start_fresh()
    assert resumed.stats_path.read_text() == resumed.samples_path.read_text() == ""
    assert resumed.stats_lines == []


def test_keep_through_without_files_leaves_empty_ones(tmp_path: Path):
    assert report(tmp_path).keep_through(4) == []
    assert (tmp_path / "stats.jsonl").read_text() == (tmp_path / "samples.jsonl").read_text() == ""


def test_trackers_get_the_numbers_of_the_stats_line():
    assert tracker_scalars({**stats_line(3), "flag": True}) == {
        "samples": 8,
        "reward_mean": 0.5,
        "objective/kl": 0.25,
        "eval/reward_mean": 0.75,
    }


def test_tensorboard_shows_the_stats_lines_once_each_after_a_resume(tmp_path: Path):
    logdir = tmp_path / "tensorboard"
    job_report = report(tmp_path, trackers=[TensorBoardTracker(logdir)])
    for iteration in (1, 2, 3):
        job_report.record(stats_line(iteration, reward=iteration))
    job_report.close()

    resumed = report(tmp_path, trackers=[TensorBoardTracker(logdir)])
    resumed.keep_through(1)
    for iteration in (2, 3):
        resumed.record(stats_line(iteration, reward=10 * iteration))
    resumed.close()

    scalars = tensorboard_scalars(logdir)
    assert scalars.keys() == {"samples", "reward_mean", "objective/kl", "eval/reward_mean"}
    assert scalars["reward_mean"] == [(1, 1.0), (2, 20.0), (3, 30.0)]
    assert scalars["eval/reward_mean"] == [(1, 0.75), (2, 0.75), (3, 0.75)]


def test_a_wandb_run_gets_the_stats_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    isolate_wandb(monkeypatch, tmp_path / "wandb-home")
    wandb = {"project": "rlfleet-test", "dir": str(tmp_path / "wb")}
    config = small_job(Path("no-model"), tmp_path / "run", logging={"wandb": wandb})
    job_report = JobReport.open(config)
    job_report.record(stats_line(1, reward=1.0))
    job_report.record(stats_line(2, reward=2.0))
    job_report.close()

    history = wandb_history(finished_run_dir(tmp_path / "wb"))
    assert [(row["_step"], row["reward_mean"]) for row in history] == [(1, 1.0), (2, 2.0)]
    assert history[0]["eval/reward_mean"] == 0.75 and "rollout_ids" not in history[0]


def test_wandb_without_the_package_is_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setitem(sys.modules, "wandb", None)
    config = small_job(
        Path("no-model"), tmp_path / "run", logging={"wandb": {"project": "rlfleet-test"}}
    )
    with pytest.raises(ConfigError) as error:
        JobReport.open(config)
    assert str(error.value) == (
        "logging.wandb: the 'wandb' package is not installed; install it "
        "(pip install 'rlfleet[trackers]') or remove logging.wandb"
    )


def test_a_resumed_job_writes_each_iteration_once_to_every_report(
    ray_local, tiny_model_dir: Path, tmp_path: Path
):
    """Three iterations, then a resume from checkpoint 2 trains iteration 3 again: both files and
    TensorBoard hold iterations 1..3 once each, the last ones those of the resumed run."""
    out, uri = tmp_path / "run", tmp_path / "checkpoints"
    config = small_job(
        tiny_model_dir,
        out,
        iterations=3,
        metrics={"enabled": False},
        checkpoint={"uri": str(uri), "every": 2},
        logging={"samples_per_iteration": 2, "tensorboard": str(tmp_path / "tb")},
    )
    for resume_from in (None, uri / "step-00000002.json"):
        job = TrainingJob(config, ROWS, None, fake_factories(config))
        try:
            if resume_from is not None:
                job.resume(str(resume_from))
            result = job.train()
        finally:
            job.shutdown()

    stats = read_stats(out)
    assert [line["iteration"] for line in stats] == [1, 2, 3]
    assert result.stats == stats[2:]
    samples = read_lines(out / "samples.jsonl")
    assert [(s["iteration"], s["rollout_id"], s["reward"]) for s in samples] == [
        (1, 0, 0.0),
        (1, 1, 1.0),
        (2, 8, 2.0),
        (2, 9, 0.0),
        (3, 16, 1.0),
        (3, 17, 2.0),
    ]
    assert {s["response"] for s in samples} == {"a b c"}
    assert {s["prompt"] for s in samples} <= {row["prompt"] for row in ROWS}
    scalars = tensorboard_scalars(tmp_path / "tb")
    assert [step for step, _ in scalars["reward_mean"]] == [1, 2, 3]
    assert [value for _, value in scalars["reward_mean"]] == pytest.approx(
        [line["reward_mean"] for line in stats]
    )
    assert scalars["objective/kl"] == [(i, 0.5) for i in (1, 2, 3)]


@pytest.mark.parametrize(
    "logging", [{"wandb": {"project": ""}}, {"tensorboard": ""}], ids=["wandb", "tensorboard"]
)
def test_an_empty_tracker_setting_is_refused(tmp_path: Path, logging: dict[str, Any]):
    with pytest.raises(ValidationError, match="at least 1 character"):
        small_job(Path("no-model"), tmp_path / "run", logging=logging)
