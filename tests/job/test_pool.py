"""The actor pool on a real local Ray: shard order, restarts, re-sends and giving up; deadlines
(an actor that stalls, or is stopped with SIGSTOP, is killed, restarted and its shard sent
again)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections import Counter
from typing import Any

import pyarrow as pa
import pytest
import ray
from driver_fakes import ShardWorker, process_id, prompts

from rlfleet.common.start_errors import ActorCannotStart
from rlfleet.job.pool import (
    MAX_DISPATCH_ATTEMPTS,
    MAX_START_ATTEMPTS,
    ActorPool,
    Deadline,
    id_range,
    split_batch,
)

STALL_S = 3600.0
"""A stalled worker's delay: longer than any test."""


def ids(batch: pa.RecordBatch) -> list[int]:
    return batch.column("rollout_id").to_pylist()


@pytest.mark.parametrize(
    ("rows", "parts", "sizes"),
    [(8, 2, [4, 4]), (8, 3, [3, 2, 3]), (5, 5, [1] * 5), (3, 8, [1, 1, 1]), (4, 1, [4])],
)
def test_split_batch_makes_contiguous_near_equal_non_empty_shards(
    rows: int, parts: int, sizes: list[int]
) -> None:
    shards = split_batch(prompts(rows), parts)
    assert [shard.num_rows for shard in shards] == sizes
    assert [i for shard in shards for i in ids(shard)] == list(range(rows))


def test_id_range_names_the_first_and_last_rollout() -> None:
    assert id_range(prompts(4, first_id=10)) == "10..13"
    assert id_range(prompts(0)) == "(none)"


class Workers:
    """Creates pool members: ``die(index, creation)`` says which ones exit on their first call,
    ``fail_start(index, creation)`` the error a member's constructor raises (None: none);
    remembers what it created and what ``on_restart`` was told."""

    def __init__(
        self,
        die=lambda index, creation: False,
        delays: dict[int, float] | None = None,
        stall=lambda index, creation: False,
        fail_start=lambda index, creation: None,
    ):
        self.die = die
        self.delays = delays or {}
        self.stall = stall
        self.fail_start = fail_start
        self.created: Counter[int] = Counter()
        self.restarted: list[tuple[int, Any]] = []

    def create(self, index: int) -> Any:
        self.created[index] += 1
        die = self.die(index, self.created[index])
        stalled = self.stall(index, self.created[index])
        delay_s = STALL_S if stalled else self.delays.get(index, 0.0)
        return ShardWorker.remote(index, die, delay_s, self.fail_start(index, self.created[index]))

    def pool(self, size: int, deadline: Deadline | None = None) -> ActorPool:
        pool = ActorPool(
            "scorer",
            self.create,
            size,
            on_restart=lambda i, a: self.restarted.append((i, a)),
            deadline=deadline,
            start_timeout_s=60,
        )
        pool.wait_ready()
        return pool


def test_results_come_back_in_shard_order_whatever_order_they_finish_in(ray_local) -> None:
    pool = Workers(delays={0: 0.5}).pool(3)
    results = pool.collect(pool.dispatch("work", split_batch(prompts(6), 3)))
    assert [ids(result) for result in results] == [[0, 1], [2, 3], [4, 5]]
    assert [result.column("score").to_pylist() for result in results] == [[0, 0], [1, 1], [2, 2]]
    assert pool.restarts == 0


def test_a_dead_actor_is_restarted_and_only_its_shard_is_sent_again(ray_local) -> None:
    workers = Workers(die=lambda index, creation: index == 1 and creation == 1)
    pool = workers.pool(3)
    first_actors = list(pool.actors)

    results = pool.collect(pool.dispatch("work", split_batch(prompts(6), 3)))

    assert [ids(result) for result in results] == [[0, 1], [2, 3], [4, 5]]
    assert pool.restarts == 1
    assert workers.created == {0: 1, 1: 2, 2: 1}
    assert workers.restarted == [(1, pool.actors[1])]
    assert pool.actors[1] != first_actors[1]
    received = ray_local.get([actor.received.remote() for actor in pool.actors])
    assert received == [[[0, 1]], [[2, 3]], [[4, 5]]]


def test_a_shard_whose_actor_keeps_dying_fails_the_job_naming_actor_and_rollouts(
    ray_local,
) -> None:
    workers = Workers(die=lambda index, creation: index == 0)
    pool = workers.pool(2)
    pending = pool.dispatch("work", split_batch(prompts(4, first_id=8), 2))
    message = f"scorer actor 0 died {MAX_DISPATCH_ATTEMPTS} times on rollouts 8..9"
    with pytest.raises(RuntimeError, match=message):
        pool.collect(pending)
    assert workers.created[0] == MAX_DISPATCH_ATTEMPTS


def test_call_all_restarts_a_dead_actor_and_answers_none_for_it(ray_local) -> None:
    workers = Workers(die=lambda index, creation: index == 0 and creation == 1)
    pool = workers.pool(2)
    assert pool.call_all("ping") == [None, 1]
    assert pool.restarts == 1
    assert [index for index, _ in workers.restarted] == [0]
    assert pool.call_all("ping") == [0, 1]


def test_an_actor_past_its_deadline_is_killed_restarted_and_only_its_shard_sent_again(
    ray_local, caplog: pytest.LogCaptureFixture
) -> None:
    workers = Workers(stall=lambda index, creation: index == 1 and creation == 1)
    pool = workers.pool(3, Deadline(2.0, 0.5, "scorer.timeout_s 2 s + 0.5 s a row"))
    stalled = pool.actors[1]
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="rlfleet.job.pool"):
        results = pool.collect(pool.dispatch("work", split_batch(prompts(6, first_id=10), 3)))
    took = time.monotonic() - started

    assert [ids(result) for result in results] == [[10, 11], [12, 13], [14, 15]]
    assert [result.column("score").to_pylist() for result in results] == [[0, 0], [1, 1], [2, 2]]
    assert pool.restarts == 1
    assert workers.created == {0: 1, 1: 2, 2: 1}
    assert [index for index, _ in workers.restarted] == [1]
    assert 3.0 <= took < 15.0  # the deadline (3 s for 2 rows), then a restart
    assert [r.getMessage() for r in caplog.records] == [
        "scorer actor 1 did not answer work within 3.0 s (scorer.timeout_s 2 s + 0.5 s a row): "
        "taken for stalled, killed and restarted, its shard (rollouts 12..13) sent again"
    ]
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(stalled.ping.remote(), timeout=30)
    received = ray.get([actor.received.remote() for actor in pool.actors])
    assert received == [[[10, 11]], [[12, 13]], [[14, 15]]]


def test_an_actor_stopped_with_sigstop_is_taken_for_stalled_at_its_deadline(ray_local) -> None:
    """Alive but silent: its process is stopped, Ray sees nothing wrong."""
    workers = Workers(delays={0: 1.0})
    pool = workers.pool(2, Deadline(3.0, source="scorer.timeout_s 3 s"))
    pid = ray.get(pool.actors[0].__ray_call__.remote(process_id))
    pending = pool.dispatch("work", split_batch(prompts(4), 2))
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        results = pool.collect(pending)
        took = time.monotonic() - started
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert [ids(result) for result in results] == [[0, 1], [2, 3]]
    assert pool.restarts == 1
    assert 3.0 <= took < 20.0


def test_a_shard_that_keeps_missing_its_deadline_fails_naming_actor_rollouts_and_deadline(
    ray_local,
) -> None:
    workers = Workers(stall=lambda index, creation: index == 0)
    pool = workers.pool(2, Deadline(1.0, source="scorer.timeout_s 1 s"))
    pending = pool.dispatch("work", split_batch(prompts(4, first_id=8), 2))
    message = (
        f"scorer actor 0 did not answer in time {MAX_DISPATCH_ATTEMPTS} times on rollouts "
        r"8..9 \(the last time: work within 1.0 s \(scorer.timeout_s 1 s\)\)"
    )
    with pytest.raises(RuntimeError, match=message):
        pool.collect(pending)
    assert workers.created[0] == MAX_DISPATCH_ATTEMPTS


def test_call_all_kills_and_restarts_an_actor_past_its_deadline_and_answers_none_for_it(
    ray_local, caplog: pytest.LogCaptureFixture
) -> None:
    """Actor 1 stalls on a shard due in 1 s: the call behind it is due 2 s later."""
    workers = Workers(stall=lambda index, creation: index == 1 and creation == 1)
    pool = workers.pool(2, Deadline(1.0))
    pool.dispatch("work", split_batch(prompts(2), 2))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="rlfleet.job.pool"):
        answers = pool.call_all("ping", timeout_s=2, source="scorer.ping_s")
    assert 3.0 <= time.monotonic() - started < 15.0
    assert answers == [0, None]
    assert pool.restarts == 1
    assert [r.getMessage() for r in caplog.records] == [
        "scorer actor 1 did not answer ping within 2 s (scorer.ping_s): taken for stalled, "
        "killed and restarted"
    ]
    assert pool.call_all("ping", timeout_s=2) == [0, 1]


def test_a_call_queued_behind_a_shard_is_due_after_that_shards_deadline(ray_local) -> None:
    """Actor 0 works 2 s on its shard (due in 5 s): a 1 s call behind it waits for the shard
    and is not taken for stalled."""
    pool = Workers(delays={0: 2.0}).pool(2, Deadline(5.0))
    pending = pool.dispatch("work", split_batch(prompts(2), 2))
    assert pool.call_all("ping", timeout_s=1) == [0, 1]
    assert [ids(result) for result in pool.collect(pending)] == [[0], [1]]
    assert pool.restarts == 0


def test_a_shard_whose_actor_was_replaced_meanwhile_goes_to_the_new_one(ray_local) -> None:
    """Actor 1 died on a shard and a call to every actor restarted it first: the shard goes
    to the new actor, which is not restarted again."""
    workers = Workers(delays={1: 2.0})
    pool = workers.pool(2, Deadline(60.0))
    pending = pool.dispatch("work", split_batch(prompts(4), 2))
    ray.kill(pool.actors[1], no_restart=True)
    assert pool.call_all("ping", timeout_s=30) == [0, None]
    results = pool.collect(pending)
    assert [ids(result) for result in results] == [[0, 1], [2, 3]]
    assert pool.restarts == 1
    assert workers.created == {0: 1, 1: 2}


def test_a_replacement_whose_constructor_fails_twice_alike_stops_at_once_naming_actor_and_error(
    ray_local, caplog: pytest.LogCaptureFixture
) -> None:
    """Actor 0 dies on its shard; each replacement's constructor raises the same error (in
    colour, over two lines): the second one ends it, with the error's first line."""
    workers = Workers(
        die=lambda index, creation: index == 0 and creation == 1,
        fail_start=lambda index, creation: (
            ValueError("\x1b[1mno GPU\x1b[0m left\nsee the log") if creation > 1 else None
        ),
    )
    pool = ActorPool("scorer", workers.create, 2, start_timeout_s=60)
    with caplog.at_level(logging.WARNING, logger="rlfleet.job.pool"):
        with pytest.raises(ActorCannotStart) as stop:
            pool.collect(pool.dispatch("work", split_batch(prompts(4), 2)))
    assert str(stop.value) == "scorer actor 0 cannot start: ValueError: no GPU left"
    assert workers.created == {0: 3, 1: 1}  # the first one, and two replacements
    assert [r.getMessage() for r in caplog.records] == [
        "scorer actor 0 died while it started (ValueError: no GPU left): starting it again "
        f"(2 of {MAX_START_ATTEMPTS} starts)"
    ]


def test_replacements_that_fail_differently_are_started_again_until_one_starts(
    ray_local,
) -> None:
    errors = {2: OSError("port taken"), 3: RuntimeError("no GPU left")}
    workers = Workers(
        die=lambda index, creation: index == 1 and creation == 1,
        fail_start=lambda index, creation: errors.get(creation) if index == 1 else None,
    )
    pool = ActorPool("scorer", workers.create, 2, start_timeout_s=60)
    results = pool.collect(pool.dispatch("work", split_batch(prompts(4), 2)))
    assert [ids(result) for result in results] == [[0, 1], [2, 3]]
    assert workers.created == {0: 1, 1: 4}
    assert pool.restarts == 1


def test_replacements_that_keep_failing_differently_stop_after_the_last_start(ray_local) -> None:
    workers = Workers(
        die=lambda index, creation: index == 0 and creation == 1,
        fail_start=lambda index, creation: (
            OSError(f"try {'x' * creation}") if creation > 1 else None
        ),
    )
    pool = ActorPool("scorer", workers.create, 1, start_timeout_s=60)
    with pytest.raises(ActorCannotStart) as stop:
        pool.collect(pool.dispatch("work", [prompts(2)]))
    assert str(stop.value) == (
        f"scorer actor 0 cannot start: {MAX_START_ATTEMPTS} starts in a row died, the last with "
        f"OSError: try {'x' * (MAX_START_ATTEMPTS + 1)}"
    )
    assert workers.created == {0: 1 + MAX_START_ATTEMPTS}
