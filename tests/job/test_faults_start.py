"""An actor whose constructor fails (fake actors, real local Ray; one real job): a failure that
repeats alike stops the job at once with one line naming the actor and the error, not after
every restart; one that differs between starts is restarted as before."""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path

import pytest
from driver_fakes import fake_factories
from support.job_configs import PROMPTS, quiet_job, write_config

from rlfleet.common.config import JobConfig
from rlfleet.common.start_errors import ActorCannotStart
from rlfleet.job.data import read_prompt_rows
from rlfleet.job.loop import JobResult, TrainingJob

ROWS = read_prompt_rows(PROMPTS, "prompt")

NO_ENGINE = "\x1b[31mno such engine\x1b[0m: 'warp'\nsecond line"
"""A constructor's error message with ANSI colours and a second line."""


def run(config: JobConfig, fail_start: dict, starts: Counter, **kwargs) -> JobResult:
    """Starts and trains the job on fakes whose constructors fail as ``fail_start`` says."""
    factories = fake_factories(config, fail_start=fail_start, starts=starts, **kwargs)
    job = TrainingJob(config, ROWS, None, factories)
    try:
        return job.train()
    finally:
        job.shutdown()


@pytest.mark.parametrize(
    ("role", "actor"), [("generator", "generator actor 1"), ("reward", "reward actor 0")]
)
def test_a_constructor_that_fails_twice_alike_at_start_up_stops_the_job_naming_the_actor(
    ray_local, tiny_model_dir: Path, tmp_path: Path, role: str, actor: str
) -> None:
    config = quiet_job(
        tiny_model_dir, tmp_path / "run", generators={"num_actors": 2}, reward={"num_actors": 2}
    )
    index = int(actor[-1])
    starts: Counter = Counter()
    with pytest.raises(ActorCannotStart) as stop:
        run(config, {(role, index): [ValueError(NO_ENGINE)] * 3}, starts)
    assert str(stop.value) == f"{actor} cannot start: ValueError: no such engine: 'warp'"
    assert starts[(role, index)] == 2  # the start and one restart, not until attempts run out
    assert starts[("learner", 0)] == 1


def test_a_replacement_whose_constructor_fails_twice_alike_stops_the_job_naming_it(
    ray_local, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Generator 1 dies sampling its first shard; its replacements fail in their constructor,
    the second as the first (only a number differs)."""
    config = quiet_job(tiny_model_dir, tmp_path / "run", generators={"num_actors": 2})
    failures = [None, MemoryError("KV cache of 10000.0 GiB, 22.4 GiB free")]
    failures.append(MemoryError("KV cache of 10000.0 GiB, 21.9 GiB free"))
    starts: Counter = Counter()
    with pytest.raises(ActorCannotStart) as stop:
        run(config, {("generator", 1): failures}, starts, die_on_call={("generator", 1): 1})
    assert str(stop.value) == (
        "generator actor 1 cannot start: MemoryError: KV cache of 10000.0 GiB, 21.9 GiB free"
    )
    assert starts[("generator", 1)] == 3


def test_constructor_failures_that_differ_are_restarted_and_the_job_trains_every_rollout(
    ray_local, tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = quiet_job(tiny_model_dir, tmp_path / "run", generators={"num_actors": 2})
    failures = {
        ("generator", 0): [OSError("port taken"), RuntimeError("port taken")],
        ("learner", 0): [ValueError("shard 1 unreadable"), ValueError("shard 2 is missing")],
    }
    starts: Counter = Counter()
    result = run(config, failures, starts)
    assert (starts[("generator", 0)], starts[("learner", 0)]) == (3, 3)
    assert (result.generator_restarts, result.learner_restarts) == (1, 2)  # 1 replacement: 2 starts
    assert result.consumed_rollout_ids == list(range(16))


def test_a_learner_rank_whose_constructor_fails_twice_alike_stops_without_more_restarts(
    ray_local, tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = quiet_job(tiny_model_dir, tmp_path / "run", learner={"num_ranks": 2})
    failure = ValueError(NO_ENGINE.replace("engine", "model type"))
    starts: Counter = Counter()
    with pytest.raises(ActorCannotStart) as stop:
        run(config, {("learner", 1): [failure] * 4}, starts)
    assert str(stop.value) == "learner rank 1 cannot start: ValueError: no such model type: 'warp'"
    assert starts[("learner", 1)] == 2  # learner.max_restarts is 3


@pytest.mark.slow
def test_an_impossible_kv_cache_ends_the_job_with_one_line_naming_the_generator(
    ray_local,
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real job whose vLLM generator asks for a 10000 GiB KV cache: its engine refuses at
    every start; the job ends after the second start with the cause, not after 3 restarts."""
    from rlfleet.cli import main
    from rlfleet.job.roles import Layout

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    start_generator = Layout.start_generator
    starts: list[int] = []

    def counted(layout: Layout, index: int):
        starts.append(index)
        return start_generator(layout, index)

    monkeypatch.setattr(Layout, "start_generator", counted)
    out = tmp_path / "run"
    job = quiet_job(tiny_model_dir, out, generators={"engine": "vllm", "kv_cache_gib": 10000})
    config = write_config(tmp_path / "job.yaml", job)

    started = time.monotonic()
    assert main(["train", "--config", str(config)]) == 1
    seconds = time.monotonic() - started

    lines = [line for line in capsys.readouterr().err.splitlines() if "rlfleet train:" in line]
    assert len(lines) == 1, lines
    assert re.match(
        r"rlfleet train: generator actor 0 cannot start: ValueError: .*memory.*10000\.0 GiB.*; "
        rf"traceback in {re.escape(str(out))}/error\.log",
        lines[0],
    ), lines[0]
    assert "\x1b" not in lines[0]
    assert starts == [0, 0]
    assert seconds < 180
