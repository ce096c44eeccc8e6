"""The actor pool on a real local Ray: shard order, restarts, re-sends and giving up."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa
import pytest
from driver_fakes import ShardWorker, prompts

from rlfleet.job.pool import MAX_DISPATCH_ATTEMPTS, ActorPool, id_range, split_batch


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
    """Creates pool members: ``die(index, creation)`` says which ones exit on their first call;
    remembers what it created and what ``on_restart`` was told."""

    def __init__(self, die=lambda index, creation: False, delays: dict[int, float] | None = None):
        self.die = die
        self.delays = delays or {}
        self.created: Counter[int] = Counter()
        self.restarted: list[tuple[int, Any]] = []

    def create(self, index: int) -> Any:
        self.created[index] += 1
        die = self.die(index, self.created[index])
        return ShardWorker.remote(index, die, self.delays.get(index, 0.0))

    def pool(self, size: int) -> ActorPool:
        pool = ActorPool(
            "scorer", self.create, size, on_restart=lambda i, a: self.restarted.append((i, a))
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
