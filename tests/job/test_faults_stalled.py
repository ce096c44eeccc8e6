"""Stalled actors on a real job (local Ray, HF-engine generators, the sentiment reward, a real
learner): a generator, a reward actor and a learner rank each stopped with SIGSTOP (alive, silent:
Ray sees nothing wrong). Each is noticed within its configured bound (the generator's and the
reward actor's shard deadline, the learner's liveness pings), killed and restarted, and the job
completes with every rollout id trained once. Each test prints how long detection took."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import ray
from driver_fakes import process_id
from support.job_configs import read_stats, small_job

from rlfleet.job.loop import JobResult, TrainingJob

ITERATIONS = 4


@pytest.fixture(autouse=True)
def short_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))


def pid_of(actor: Any) -> int:
    return ray.get(actor.__ray_call__.remote(process_id), timeout=120)


class Stopper:
    """A dispatch hook that stops (SIGSTOP) the process ``victim(job)`` names when the batch of
    ``at`` (kind, iteration) goes out, once; remembers the pid and the wall-clock time."""

    def __init__(self, at: tuple[str, int], victim: Callable[[TrainingJob], int]) -> None:
        self.at = at
        self.victim = victim
        self.job: TrainingJob | None = None
        self.stopped: list[tuple[int, float]] = []

    def __call__(self, kind: str, iteration: int, actors: list) -> None:
        if (kind, iteration) == self.at and not self.stopped:
            assert self.job is not None
            pid = self.victim(self.job)
            os.kill(pid, signal.SIGSTOP)
            self.stopped.append((pid, time.time()))

    def release(self) -> None:
        for pid, _ in self.stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def run_stopping(
    config: Any, stopper: Stopper, before: Callable[[TrainingJob], None] | None = None
) -> JobResult:
    job = TrainingJob(config, on_dispatch=stopper)
    stopper.job = job
    try:
        if before:
            before(job)
        return job.train()
    finally:
        job.shutdown()
        stopper.release()


def detection_s(caplog: pytest.LogCaptureFixture, stopper: Stopper, starts: str) -> float:
    """Seconds from the stop to the one line that named the stalled actor."""
    [line] = [r for r in caplog.records if r.getMessage().startswith(starts)]
    return line.created - stopper.stopped[0][1]


def assert_every_rollout_once(out: Path, result: JobResult) -> None:
    stats = read_stats(out)
    assert [line["iteration"] for line in stats] == list(range(1, ITERATIONS + 1))
    trained = [
        i for line in stats for i in range(line["rollout_ids"][0], line["rollout_ids"][1] + 1)
    ]
    assert trained == list(range(8 * ITERATIONS))
    assert result.consumed_rollout_ids == list(range(8 * ITERATIONS))


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_a_stopped_generator_is_killed_at_its_shard_deadline_and_its_shard_sampled_again(
    ray_local,
    tiny_model_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    engine: str,
) -> None:
    """generators.timeout_s 5: generator 0's shard of 4 rows x 8 tokens is due 5.3 s after it
    was sent."""
    out = tmp_path / "run"
    config = small_job(
        tiny_model_dir,
        out,
        iterations=ITERATIONS,
        generators={"num_actors": 2, "engine": engine, "timeout_s": 5},
        metrics={"enabled": False},
    )
    pids: dict[int, int] = {}
    stopper = Stopper(("generator", 2), lambda job: pids[0])

    def find_pids(job: TrainingJob) -> None:
        pids.update(enumerate(map(pid_of, job.generators.actors)))

    with caplog.at_level(logging.WARNING, logger="rlfleet.job.pool"):
        result = run_stopping(config, stopper, before=find_pids)

    took = detection_s(caplog, stopper, "generator actor 0 did not answer generate")
    print(
        f"\n{engine} generator stopped with SIGSTOP: detected after {took:.1f} s (deadline 5.3 s)"
    )
    assert [r.getMessage() for r in caplog.records] == [
        "generator actor 0 did not answer generate within 5.3 s (generators.timeout_s 5 s + "
        "0.01 s per token, 8 tokens a row): taken for stalled, killed and restarted, its shard "
        "(rollouts 16..19) sent again"
    ]
    assert 5.3 <= took < 15.0
    assert (result.generator_restarts, result.reward_restarts, result.learner_restarts) == (1, 0, 0)
    assert_every_rollout_once(out, result)
    assert [line["sampled_with_versions"] for line in result.stats] == [[i] for i in range(4)]


@pytest.mark.slow
def test_a_stopped_reward_actor_is_killed_at_its_deadline_and_its_shard_scored_again(
    ray_local, tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """reward.timeout_s 5: a shard is due 5 s + 30 s after it was sent. Reward actor 0 is
    stopped while it is idle (batch 3 is being sampled), so its shard of batch 3 never comes
    back."""
    out = tmp_path / "run"
    config = small_job(
        tiny_model_dir,
        out,
        iterations=ITERATIONS,
        generators={"engine": "hf"},
        reward={"num_actors": 2, "timeout_s": 5},
        metrics={"enabled": False},
    )
    stopper = Stopper(("generator", 2), lambda job: pid_of(job.rewards.actors[0]))

    with caplog.at_level(logging.WARNING, logger="rlfleet.job.pool"):
        result = run_stopping(config, stopper)

    took = detection_s(caplog, stopper, "reward actor 0 did not answer score")
    print(f"\nreward actor stopped with SIGSTOP: detected after {took:.1f} s (deadline 35 s)")
    assert [r.getMessage() for r in caplog.records] == [
        "reward actor 0 did not answer score within 35.0 s (reward.timeout_s 5 s + 30 s): taken "
        "for stalled, killed and restarted, its shard (rollouts 16..19) sent again"
    ]
    assert 35.0 <= took < 60.0  # from the stop, before the shard was even sent
    assert (result.generator_restarts, result.reward_restarts, result.learner_restarts) == (0, 1, 0)
    assert_every_rollout_once(out, result)


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2], ids=["one-rank", "rank-1-of-2"])
def test_a_stopped_learner_rank_is_noticed_by_its_liveness_pings_and_the_learner_restarted(
    ray_local, tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, ranks: int
) -> None:
    """learner.liveness_timeout_s 10 (learner.timeout_s stays 600: without the pings the stop
    would be noticed after 660 s, or when the other rank's collective gives up). The last rank
    is stopped while batch 4 is scored, before its step; the new learner restores checkpoint 2
    (in the same placement group) and batches 3 and 4 are trained again."""
    out = tmp_path / "run"
    config = small_job(
        tiny_model_dir,
        out,
        iterations=ITERATIONS,
        generators={"engine": "hf"},
        learner={"liveness_timeout_s": 10, "num_ranks": ranks},
        checkpoint={"uri": str(tmp_path / "checkpoints"), "every": 2},
        metrics={"enabled": False},
    )
    stopper = Stopper(("reward", 3), lambda job: pid_of(job.learner.ranks[-1]))

    with caplog.at_level(logging.WARNING, logger="rlfleet.job.loop"):
        result = run_stopping(config, stopper)

    took = detection_s(caplog, stopper, "restarting the learner")
    print(f"\nlearner rank stopped with SIGSTOP: detected after {took:.1f} s (liveness 10 s)")
    assert [r.getMessage() for r in caplog.records] == [
        f"restarting the learner (1 of 3): learner rank {ranks - 1}: stalled in step: no answer "
        "to a liveness ping within 10 s (learner.liveness_timeout_s)"
    ]
    assert 10.0 <= took < 25.0
    assert (result.generator_restarts, result.reward_restarts, result.learner_restarts) == (0, 0, 1)
    assert_every_rollout_once(out, result)
    assert [line["learner_restarts"] for line in result.stats] == [0, 0, 1, 1]
