"""Hangs the driver notices, with fake actors on a real local Ray: a learner rank stopped with
SIGSTOP (alive, silent) fails the call within ``learner.liveness_timeout_s`` and the learner is
restarted; published weights lost with their owner (the learner) restart the learner instead of
ending the job; SIGTERM stops a job blocked on a silent actor within seconds; a ``ray_address``
that nothing answers at fails within a bound, with one line."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from driver_fakes import (
    LEARNER_STATS,
    FakeLearner,
    fake_factories,
    nap,
    process_id,
    prompts,
)
from support.job_configs import PROMPTS, quiet_job, read_stats, write_config

from rlfleet.cli import main
from rlfleet.common import waits
from rlfleet.common.config import JobConfig
from rlfleet.common.schema import with_columns
from rlfleet.job import cluster, train
from rlfleet.job.data import read_prompt_rows
from rlfleet.job.loop import JobResult, TrainingJob
from rlfleet.job.pool import ActorPool
from rlfleet.job.sync import weights_lost
from rlfleet.learner.rank_group import ActorWaitError, LearnerGroup, PendingCall

ROWS = read_prompt_rows(PROMPTS, "prompt")


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """Stops process ``pid`` (SIGSTOP); lets it go on afterwards if it is still there."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def scored(n: int) -> Any:
    return with_columns(prompts(n), response_ids=[[1]] * n, policy_version=[0] * n, score=[0.0] * n)


# -- a learner rank that stops answering -------------------------------------------------------


def test_a_stopped_learner_rank_fails_the_call_within_the_liveness_timeout(ray_local) -> None:
    rank = FakeLearner.remote("liveness", 0, False, LEARNER_STATS)
    group = LearnerGroup([rank], timeout_s=600, liveness_timeout_s=2)
    group.ready()
    pid = ray.get(rank.__ray_call__.remote(process_id))
    try:
        with stopped(pid):
            started = time.monotonic()
            with pytest.raises(ActorWaitError) as failure:
                group.step(scored(2))
            took = time.monotonic() - started
    finally:
        group.kill()
    assert str(failure.value) == (
        "learner rank 0: stalled in step: no answer to a liveness ping within 2 s "
        "(learner.liveness_timeout_s)"
    )
    assert failure.value.learner_failed
    assert 2.0 <= took < 10.0  # not learner.timeout_s + 60 s


def test_a_busy_learner_rank_answers_its_pings_and_is_not_taken_for_stalled(ray_local) -> None:
    """A call that takes 5 s, with a liveness timeout of 1 s: the rank answers the pings from
    a thread of its own while it works."""
    rank = FakeLearner.remote("liveness", 0, False, LEARNER_STATS)
    group = LearnerGroup([rank], timeout_s=600, liveness_timeout_s=1)
    try:
        assert group.wait(PendingCall("nap", [rank.__ray_call__.remote(nap, 5.0)])) == 5.0
    finally:
        group.kill()


def assert_every_rollout_once(out: Path, result: JobResult, iterations: int) -> None:
    stats = read_stats(out)
    assert [line["iteration"] for line in stats] == list(range(1, iterations + 1))
    assert [line["rollout_ids"] for line in stats] == [
        [8 * i, 8 * i + 7] for i in range(iterations)
    ]
    assert result.consumed_rollout_ids == list(range(8 * iterations))


def test_a_job_whose_learner_rank_is_stopped_restarts_the_learner_and_trains_every_id_once(
    ray_local, tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    config = quiet_job(
        tiny_model_dir,
        out,
        iterations=4,
        learner={"liveness_timeout_s": 3},
        checkpoint={"uri": str(tmp_path / "checkpoints"), "every": 2},
    )
    stops: list[tuple[int, float]] = []

    def stop_rank_0(kind: str, iteration: int, actors: list) -> None:
        """While batch 3 is scored (the learner is idle), before its step."""
        if (kind, iteration) == ("reward", 2) and not stops:
            pid = ray.get(job.learner.ranks[0].__ray_call__.remote(process_id))
            os.kill(pid, signal.SIGSTOP)
            stops.append((pid, time.time()))

    job = TrainingJob(config, ROWS, stop_rank_0, fake_factories(config))
    try:
        with caplog.at_level(logging.WARNING, logger="rlfleet.job.loop"):
            result = job.train()
    finally:
        job.shutdown()
        for pid, _ in stops:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    [restart] = [r for r in caplog.records if r.getMessage().startswith("restarting the learner")]
    detected_s = restart.created - stops[0][1]
    assert restart.getMessage() == (
        "restarting the learner (1 of 3): learner rank 0: stalled in step: no answer to a "
        "liveness ping within 3 s (learner.liveness_timeout_s)"
    )
    assert 3.0 <= detected_s < 12.0
    assert result.learner_restarts == 1
    assert_every_rollout_once(out, result, 4)


def test_a_generator_stopped_before_a_sync_misses_its_weight_load_deadline_and_is_restarted(
    ray_local, tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the object store (the default on CPUs): generator 1 is stopped while batch 2 is
    scored, so it never loads version 2; weight_sync.timeout_s 3 later it is restarted (and
    loads it), and the job goes on."""
    out = tmp_path / "run"
    config = quiet_job(
        tiny_model_dir,
        out,
        iterations=3,
        generators={"num_actors": 2},
        weight_sync={"timeout_s": 3},
    )
    stops: list[tuple[int, float]] = []

    def stop_generator_1(kind: str, iteration: int, actors: list) -> None:
        if (kind, iteration) == ("reward", 1) and not stops:
            pid = ray.get(job.generators.actors[1].__ray_call__.remote(process_id))
            os.kill(pid, signal.SIGSTOP)
            stops.append((pid, time.time()))

    job = TrainingJob(config, ROWS, stop_generator_1, fake_factories(config))
    try:
        with caplog.at_level(logging.WARNING, logger="rlfleet.job.pool"):
            result = job.train()
    finally:
        job.shutdown()
        for pid, _ in stops:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    [line] = caplog.records
    assert line.getMessage() == (
        "generator actor 1 did not answer load_weights within 3 s (weight_sync.timeout_s): "
        "taken for stalled, killed and restarted"
    )
    assert 3.0 <= line.created - stops[0][1] < 10.0
    assert result.generator_restarts == 1
    assert_every_rollout_once(out, result, 3)
    assert [line["sampled_with_versions"] for line in result.stats] == [[0], [1], [2]]


# -- published weights lost with their owner ---------------------------------------------------


def test_an_owner_died_error_even_inside_a_weight_load_error_is_a_lost_object() -> None:
    owner_died = ray.exceptions.OwnerDiedError("ff" * 28, None, "")
    assert weights_lost(owner_died)
    assert weights_lost(ray.exceptions.ObjectLostError("ff" * 28, None, ""))
    wrapped = RuntimeError("generator 0: its vllm engine could not load the published weights")
    wrapped.__cause__ = owner_died
    assert weights_lost(wrapped)
    remote = ray.exceptions.RayTaskError(
        "GeneratorActor.load_weights",
        "Traceback (most recent call last): ...",
        RuntimeError(
            "generator 0: its vllm engine could not load the published weights: "
            "OwnerDiedError: Failed to retrieve object 00ff. The object's owner has exited."
        ),
    )
    assert weights_lost(remote)
    assert not weights_lost(RuntimeError("size mismatch for lm_head.weight"))
    assert not weights_lost(ray.exceptions.RayActorError())


def test_weights_lost_with_the_learner_mid_sync_restart_the_learner_and_resync(
    ray_local, tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Learner rank 0 dies right after it published version 2 (its weights an object it
    owns): the generators' loads fail with OwnerDiedError inside a WeightLoadError. The job
    restarts the learner from checkpoint 1 (2 was not saved yet), publishes and syncs again,
    and trains every rollout id once."""
    out = tmp_path / "run"
    config = quiet_job(
        tiny_model_dir,
        out,
        iterations=4,
        checkpoint={"uri": str(tmp_path / "checkpoints"), "every": 1},
    )
    killed: list[int] = []

    def kill_after_publishing(kind: str, iteration: int, actors: list) -> None:
        if (kind, iteration) != ("reward", 1) or killed:
            return
        learner = job.learner
        publish = learner.publish_weights

        def publish_then_die() -> Any:
            handle = publish()
            ray.kill(learner.ranks[0], no_restart=True)
            gone_by = time.monotonic() + 30
            while time.monotonic() < gone_by:  # its objects are freed a moment after it died
                try:
                    ray.get(handle.ref[0], timeout=5)
                except ray.exceptions.ObjectLostError:
                    break
                time.sleep(0.2)
            killed.append(handle.version)
            return handle

        learner.publish_weights = publish_then_die

    job = TrainingJob(
        config, ROWS, kill_after_publishing, fake_factories(config, publish_objects=True)
    )
    try:
        with caplog.at_level(logging.WARNING, logger="rlfleet.job.loop"):
            result = job.train()
    finally:
        job.shutdown()
    assert killed == [2]
    [restart] = [r for r in caplog.records if r.getMessage().startswith("restarting the learner")]
    assert restart.getMessage().startswith(
        "restarting the learner (1 of 3): weight sync: the published weights were lost while "
        "the generators loaded them: their owner, learner rank 0, died (WeightLoadError: "
        "generator 0: its fake engine could not load the published weights: OwnerDiedError: "
    )
    assert result.learner_restarts == 1
    assert_every_rollout_once(out, result, 4)
    versions = [line["sampled_with_versions"] for line in result.stats]
    assert versions == [[0], [1], [2], [3]]


# -- stopping a job that waits on a silent actor -----------------------------------------------


def send_soon(signum: int, after_s: float) -> threading.Timer:
    timer = threading.Timer(after_s, lambda: os.kill(os.getpid(), signum))
    timer.start()
    return timer


def test_a_stop_signal_ends_a_wait_on_a_silent_actor_within_seconds(ray_local) -> None:
    """No deadline, a stopped actor: the wait is in slices, so SIGTERM's handler runs (raising
    inside Ray's call would come out as a SystemError)."""
    from driver_fakes import ShardWorker

    pool = ActorPool("scorer", lambda i: ShardWorker.remote(i), 1)
    pool.wait_ready()
    pid = ray.get(pool.actors[0].__ray_call__.remote(process_id))
    handlers = {sig: signal.getsignal(sig) for sig in train.STOP_SIGNALS}
    pending = pool.dispatch("work", [prompts(2)])
    try:
        with stopped(pid), pytest.raises(train.JobStopped) as stop:
            with train.stopped_by_signals():
                send_soon(signal.SIGTERM, 1.0)
                started = time.monotonic()
                try:
                    pool.collect(pending)
                finally:
                    took = time.monotonic() - started
    finally:
        ray.kill(pool.actors[0], no_restart=True)
    assert stop.value.name == "SIGTERM"
    assert 1.0 <= took < 4.0
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers


def test_sigterm_stops_rlfleet_train_blocked_on_a_stopped_generator_within_seconds(
    ray_local,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """Generator 0 is stopped with SIGSTOP while batch 1 is scored (it is idle then); the job
    then waits on it to load the new weights (due in weight_sync.timeout_s, minutes away), and
    SIGTERM a second later stops the job with its one line and 143."""
    config = quiet_job(tiny_model_dir, tmp_path / "run", iterations=5)
    jobs: list[TrainingJob] = []
    stops: list[tuple[int, float]] = []

    def fake_job_of(config: JobConfig, rows: list[dict[str, Any]], on_dispatch=None) -> Any:
        jobs.append(TrainingJob(config, rows, on_dispatch, fake_factories(config)))
        return jobs[-1]

    def stop_generator(kind: str, iteration: int, actors: list) -> None:
        if (kind, iteration) == ("reward", 0) and not stops:
            pid = ray.get(jobs[0].generators.actors[0].__ray_call__.remote(process_id))
            os.kill(pid, signal.SIGSTOP)
            stops.append((pid, time.monotonic()))
            send_soon(signal.SIGTERM, 1.0)

    monkeypatch.setattr(train, "TrainingJob", fake_job_of)
    monkeypatch.setattr(train, "init_ray", lambda config: None)
    monkeypatch.setattr(
        train, "run_job", functools.partial(train.run_job, on_dispatch=stop_generator)
    )
    try:
        status = main(["train", "--config", str(write_config(tmp_path / "job.yaml", config))])
        took = time.monotonic() - stops[0][1]
    finally:
        for pid, _ in stops:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert status == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "rlfleet train: stopped by SIGTERM; run the same command"
    )
    assert took < 6.0  # SIGTERM 1 s after the stop, then at most a slice and the clean-up
    assert read_stats(tmp_path / "run") == []  # iteration 1's line comes after its sync


# -- a Ray address that nothing answers at -----------------------------------------------------


def test_an_address_nothing_answers_at_fails_within_the_bound_naming_it() -> None:
    started = time.monotonic()
    with pytest.raises(cluster.RayUnreachable) as failure:
        cluster.check_reachable("127.0.0.1:1", "ray_address", timeout_s=2)
    assert 2.0 <= time.monotonic() - started < 5.0
    assert str(failure.value).startswith(
        "ray_address: nothing answers at 127.0.0.1:1 within 2 s; check the address"
    )


def test_an_address_that_answers_or_is_not_host_and_port_passes_at_once() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        cluster.check_reachable(f"127.0.0.1:{server.getsockname()[1]}", "ray_address", 2)
    for address in ("auto", "local", "ray://head:10001", "http://head:8265"):
        cluster.check_reachable(address, "ray_address", timeout_s=0)


def test_rlfleet_train_with_an_unreachable_ray_address_exits_1_with_one_line(
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    config = quiet_job(tiny_model_dir, tmp_path / "run", ray_address="127.0.0.1:1")
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT_S", 2.0)
    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: False)
    started = time.monotonic()
    status = main(["train", "--config", str(write_config(tmp_path / "job.yaml", config))])
    assert status == 1
    assert time.monotonic() - started < 10.0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (
        "rlfleet train: ray_address: nothing answers at 127.0.0.1:1 within 2 s; check the "
        "address (the head node's GCS, host:port, by default port 6379) and that the Ray "
        "cluster is up (ray status on the head node)"
    )


def test_sigterm_stops_rlfleet_train_while_it_tries_to_reach_the_cluster(
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    config = quiet_job(tiny_model_dir, tmp_path / "run", ray_address="127.0.0.1:1")
    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: False)
    check_reachable = cluster.check_reachable
    sent: list[float] = []

    def signalled_soon(*args: Any, **kwargs: Any) -> None:
        send_soon(signal.SIGTERM, 1.0)  # once the job tries the address (SIGTERM is handled)
        sent.append(time.monotonic())
        check_reachable(*args, **kwargs)

    monkeypatch.setattr(cluster, "check_reachable", signalled_soon)
    status = main(["train", "--config", str(write_config(tmp_path / "job.yaml", config))])
    assert status == 143
    assert time.monotonic() - sent[0] < 4.0  # not CONNECT_TIMEOUT_S
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "rlfleet train: stopped by SIGTERM; run the same command"
    )


def test_waits_raise_a_recorded_stop_between_slices(ray_local) -> None:
    ref = ray.remote(lambda: time.sleep(30)).options(num_cpus=0).remote()
    waits.interrupt(KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        waits.wait([ref], time.monotonic() + 60)
    ray.cancel(ref, force=True)


# -- the learner's placement group after a failed start ----------------------------------------


def test_a_learner_start_after_its_placement_group_was_removed_places_it_in_a_new_one(
    ray_local, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A learner start that fails (its bundles not reserved, rank 0's node not found in time)
    removes the placement group; the next restart used to wait on the removed one and end the
    job with Ray's ``Placement group ... does not exist``."""
    from ray.util.placement_group import remove_placement_group

    from rlfleet.common.transport import resolved_weight_sync
    from rlfleet.job.roles import Layout
    from rlfleet.learner.rank_group import wait_placed

    config = quiet_job(tiny_model_dir, tmp_path / "run")
    layout = Layout(config, resolved_weight_sync(config))
    removed = layout.placement
    assert layout.placement is removed  # made once, while it exists
    remove_placement_group(removed)
    with pytest.raises(Exception, match="does not exist"):
        wait_placed(removed, 5)

    group = layout.start_learner()
    try:
        assert group.placement is layout.placement
        assert group.placement != removed
        wait_placed(group.placement, 5)
    finally:
        group.kill()
