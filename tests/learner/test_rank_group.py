"""The learner's rank group with fake rank actors on a real local Ray: every call reaches every
rank, rank 0 answers, a dead or stalled rank fails the call naming it within the deadline, and
ranks start in one placement group knowing their place in the process group."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import pytest
import ray
import ray.cloudpickle

from rlfleet.learner.rank_group import (
    ActorWaitError,
    LearnerGroup,
    RankSpec,
    create_placement,
    start_learner_group,
    wait_all,
)

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@ray.remote(num_cpus=0)
class FakeRank:
    """Answers ``step`` with its rank and the argument; told to, it dies or stalls there."""

    def __init__(self, rank: int, fail: str | None = None, spec: RankSpec | None = None) -> None:
        self.rank = rank
        self.fail = fail
        self.spec = spec
        self.calls: list[tuple[str, Any]] = []

    def ready(self) -> int:
        return self.rank

    def step(self, batch: Any) -> dict[str, Any]:
        self.calls.append(("step", batch))
        if self.fail == "die":
            os._exit(1)
        if self.fail == "stall":
            time.sleep(60)
        return {"rank": self.rank, "batch": batch}

    def received(self) -> list[tuple[str, Any]]:
        return self.calls

    def place(self) -> RankSpec | None:
        return self.spec


def group_of(*fails: str | None, timeout_s: float = 30.0) -> LearnerGroup:
    ranks = [FakeRank.remote(rank, fail) for rank, fail in enumerate(fails)]
    return LearnerGroup(ranks, timeout_s, margin_s=0.5)


def test_every_rank_gets_each_call_and_rank_0_answers(ray_local) -> None:
    group = group_of(None, None, None)
    try:
        assert group.ready() == 0
        assert group.step({"rollouts": [1, 2]}) == {"rank": 0, "batch": {"rollouts": [1, 2]}}
        for rank in group.ranks:
            assert ray.get(rank.received.remote()) == [("step", {"rollouts": [1, 2]})]
    finally:
        group.kill()


def test_a_rank_that_dies_fails_the_call_at_once_naming_it(ray_local) -> None:
    group = group_of(None, "die", timeout_s=60)
    started = time.monotonic()
    try:
        with pytest.raises(ActorWaitError, match=r"^learner rank 1 died in step: "):
            group.step("batch")
    finally:
        group.kill()
    assert time.monotonic() - started < 30  # long before the 60 s deadline


def test_a_stalled_rank_fails_the_call_at_the_deadline_naming_it(ray_local) -> None:
    group = group_of(None, None, "stall", timeout_s=1.0)
    wait_all(group.ready_calls(), 60, "at start-up")  # a loaded machine starts actors slowly
    started = time.monotonic()
    try:
        with pytest.raises(
            ActorWaitError, match=r"^learner rank 2: no answer in step within 1.5 s"
        ):
            group.step("batch")
    finally:
        group.kill()
    assert 1.5 <= time.monotonic() - started < 10


def test_an_error_the_call_raised_comes_back_as_it_is(ray_local) -> None:
    @ray.remote(num_cpus=0)
    def refuse() -> None:
        raise ValueError("rollout 3 was already consumed")

    with pytest.raises(ray.exceptions.RayTaskError, match="rollout 3 was already consumed"):
        wait_all([("learner rank 0", refuse.remote())], 10, "in step")


def test_ranks_start_in_one_placement_group_knowing_their_place(ray_local) -> None:
    placement = create_placement([{"CPU": 0.25, "GPU": 0.0}] * 2)

    def create(spec: RankSpec, strategy: Any) -> Any:
        return FakeRank.options(num_cpus=0.25, scheduling_strategy=strategy).remote(
            spec.rank, spec=spec
        )

    group = start_learner_group(create, placement, num_ranks=2, timeout_s=30)
    try:
        assert wait_all(group.ready_calls(), 30, "at start-up") == [0, 1]
        specs = [ray.get(rank.place.remote()) for rank in group.ranks]
    finally:
        group.kill()
    host, port = specs[0].master_addr, specs[0].master_port
    assert host and 0 < port < 65536
    assert specs == [RankSpec(rank, 2, host, port, ranks_on_node=2) for rank in range(2)]


def test_bundles_ray_cannot_reserve_fail_naming_them_and_are_given_up(ray_local) -> None:
    placement = create_placement([{"CPU": 1000.0}])
    with pytest.raises(ActorWaitError, match=r"could not reserve the ranks' bundles"):
        start_learner_group(lambda spec, strategy: None, placement, 1, timeout_s=1)
    table = ray.util.placement_group_table(placement)
    assert table["state"] == "REMOVED"  # not left waiting for resources


def test_ranks_killed_for_a_restart_leave_their_placement_group_to_new_ranks(ray_local) -> None:
    """Each bundle fits one rank: the new ranks start once the killed ones freed it."""
    placement = create_placement([{"CPU": 0.25, "GPU": 0.0}] * 2)

    def create(spec: RankSpec, strategy: Any) -> Any:
        return FakeRank.options(num_cpus=0.25, scheduling_strategy=strategy).remote(
            spec.rank, spec=spec
        )

    first = start_learner_group(create, placement, num_ranks=2, timeout_s=30)
    assert wait_all(first.ready_calls(), 30, "at start-up") == [0, 1]
    first.kill_ranks()
    assert ray.util.placement_group_table(placement)["state"] == "CREATED"
    second = start_learner_group(create, placement, num_ranks=2, timeout_s=30)
    try:
        assert wait_all(second.ready_calls(), 30, "at restart") == [0, 1]
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(first.ranks[0].ready.remote(), timeout=30)
    finally:
        second.kill()
    assert ray.util.placement_group_table(placement)["state"] == "REMOVED"
