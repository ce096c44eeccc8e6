"""The collective transport on CPU with gloo, every member a thread of this process (each with
its own store client and process group, as in separate processes): exact round trips in
buckets, dtype casts, tied weights once, and deadlines that end every member's wait when one
stalls or leaves."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import torch
from torch.distributed import TCPStore

from rlfleet.common.config import JobConfig, WeightSyncConfig
from rlfleet.common.transport import (
    TRANSPORTS,
    CollectiveError,
    CollectiveHandle,
    GroupSpec,
    make_publisher,
    make_receiver,
    resolve_transport,
    resolved_weight_sync,
)
from rlfleet.common.transport.collective import (
    CollectivePublisher,
    CollectiveReceiver,
    plan_buckets,
)


def _weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    embedding = torch.randn(64, 32)
    return {
        "wte.weight": embedding,
        "h.0.weight": torch.randn(32, 48).t(),  # not contiguous
        "h.0.bias": torch.randn(48),
        "h.0.steps": torch.tensor([7, 8], dtype=torch.int64),
        "big.weight": torch.randn(300, 300),  # larger than a bucket: travels alone
        "lm_head.weight": embedding,  # tied: sent once
    }


class Members:
    """A publisher (rank 0) and ``n`` receivers joined to one fresh group (new ends, or the
    ``ends`` of an earlier group: ``(publisher, receivers)``)."""

    def __init__(
        self, n: int, timeout_s: float = 5.0, bucket_mb: float = 0.05, dtype=None, ends=None
    ):
        self.store = TCPStore(
            "127.0.0.1",
            0,
            n + 1,
            True,
            timeout=timedelta(seconds=timeout_s),
            wait_for_workers=False,
        )
        self.spec = GroupSpec("127.0.0.1", self.store.port, n + 1, 7, "gloo", timeout_s)
        self.publisher, self.receivers = ends or (
            CollectivePublisher(bucket_mb=bucket_mb, dtype=dtype),
            [CollectiveReceiver() for _ in range(n)],
        )
        in_parallel(
            [lambda: self.publisher.join(self.spec)]
            + [lambda r=r, i=i: r.join(self.spec, i + 1) for i, r in enumerate(self.receivers)]
        )

    def sync(self, weights, version: int, before_receive=None) -> tuple[object, list[object]]:
        """Publishes while every receiver receives; each one's outcome (result or error)."""

        def receive(index: int, receiver: CollectiveReceiver):
            if before_receive:
                before_receive(index, receiver)
            got = [
                (name, tensor.clone())
                for bucket in receiver.receive(CollectiveHandle(self.spec.group_id))
                for name, tensor in bucket
            ]
            return receiver.version, got

        outcomes = in_parallel(
            [lambda: self.publisher.publish(iter(weights.items()), version)]
            + [lambda i=i, r=r: receive(i, r) for i, r in enumerate(self.receivers)]
        )
        return outcomes[0], outcomes[1:]


def in_parallel(calls) -> list[object]:
    """Runs every call in its own thread; each one's result or exception."""
    results: list[object] = [None] * len(calls)

    def run(index: int) -> None:
        try:
            results[index] = calls[index]()
        except Exception as exc:  # noqa: BLE001 - returned for the test to judge
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a member hung"
    return results


def test_every_receiver_gets_every_tensor_exactly_in_buckets_with_the_version():
    weights = _weights()
    members = Members(2)
    handle, received = members.sync(weights, version=3)

    assert (handle.group_id, handle.version) == (7, 3)
    unique = [name for name in weights if name != "lm_head.weight"]
    for version, got in received:
        assert version == 3
        assert [name for name, _ in got] == unique
        for name, tensor in got:
            assert tensor.dtype == weights[name].dtype
            assert torch.equal(tensor, weights[name]), name
    # a second sync over the same group
    _, again = members.sync({"h.0.bias": torch.ones(48)}, version=4)
    assert [(v, [n for n, _ in got]) for v, got in again] == [(4, ["h.0.bias"])] * 2


def test_buckets_hold_at_most_bucket_mb_and_a_larger_tensor_alone():
    weights = _weights()
    bucket_bytes = int(0.05 * 2**20)
    plans = list(plan_buckets(weights.items(), bucket_bytes, None))
    assert [[e.name for e in p.entries] for p in plans] == [
        ["wte.weight", "h.0.weight", "h.0.bias", "h.0.steps"],
        ["big.weight"],
    ]
    assert plans[0].nbytes <= bucket_bytes < plans[1].nbytes == 300 * 300 * 4


def test_floating_point_tensors_travel_in_the_engine_dtype():
    weights = _weights()
    members = Members(1, dtype=torch.bfloat16)
    _, [(_, got)] = members.sync(weights, version=1)
    got = dict(got)
    assert got["h.0.bias"].dtype == torch.bfloat16
    assert torch.equal(got["h.0.bias"], weights["h.0.bias"].bfloat16())
    assert got["h.0.steps"].dtype == torch.int64


def test_the_next_bucket_arrives_while_the_receiver_still_loads_the_one_before():
    """Each payload ends with the next bucket's head, so a receiver posts the next broadcast
    before it hands a bucket over: the learner's whole sync (here the first bucket, then 32 MiB,
    far more than a socket buffers) completes while the receiver still holds the first."""
    weights = {"small.weight": torch.ones(4), "large.weight": torch.ones(8 * 2**20)}
    members = Members(1, timeout_s=10.0, bucket_mb=1.0)
    [receiver] = members.receivers
    published = threading.Event()

    def publish():
        handle = members.publisher.publish(iter(weights.items()), 1)
        published.set()
        return handle

    def receive():
        buckets = receiver.receive(CollectiveHandle(members.spec.group_id))
        first = next(buckets)
        sent_while_loading = published.wait(timeout=8.0)
        rest = [bucket for bucket in buckets]
        return first, rest, sent_while_loading

    published_handle, (first, rest, sent_while_loading) = in_parallel([publish, receive])
    assert [name for name, _ in first] == ["small.weight"]
    assert [[name for name, _ in bucket] for bucket in rest] == [["large.weight"]]
    assert sent_while_loading
    assert published_handle.version == receiver.version == 1


def test_a_stalled_receiver_makes_every_member_fail_within_the_deadline():
    timeout_s = 2.0
    members = Members(2, timeout_s=timeout_s)

    def stall_second(index: int, _receiver) -> None:
        if index == 1:
            time.sleep(timeout_s + 1.0)

    started = time.monotonic()
    published, received = members.sync(_weights(), 1, before_receive=stall_second)
    elapsed = time.monotonic() - started

    assert isinstance(published, CollectiveError)
    assert "rank 0: broadcast failed (2 s deadline)" in str(published)
    assert all(isinstance(outcome, CollectiveError) for outcome in received)
    assert elapsed < 2 * timeout_s + 2.0
    # the publisher gave up the group and says so, it does not wait on it
    with pytest.raises(CollectiveError, match="in no weight group"):
        members.publisher.publish(iter(_weights().items()), 2)


def test_a_new_group_works_after_a_failed_one():
    members = Members(1, timeout_s=1.0)
    members.sync(_weights(), 1, before_receive=lambda *_: time.sleep(2.0))
    fresh = Members(1, timeout_s=5.0, ends=(members.publisher, members.receivers))
    _, [(version, got)] = fresh.sync({"h.0.bias": torch.ones(3)}, version=2)
    assert version == 2 and torch.equal(dict(got)["h.0.bias"], torch.ones(3))


def test_joining_a_group_nobody_else_joins_fails_within_its_deadline():
    store = TCPStore("127.0.0.1", 0, 2, True, timeout=timedelta(seconds=1), wait_for_workers=False)
    spec = GroupSpec("127.0.0.1", store.port, 2, 1, "gloo", 1.0)
    started = time.monotonic()
    with pytest.raises(CollectiveError, match="rank 0 could not join weight group 1"):
        CollectivePublisher().join(spec)
    assert time.monotonic() - started < 10


def test_a_receiver_refuses_a_sync_of_another_group():
    receiver = CollectiveReceiver()
    with pytest.raises(CollectiveError, match="in weight group none, the sync is in 3"):
        next(receiver.receive(CollectiveHandle(3)))
    with pytest.raises(TypeError, match="expected a CollectiveHandle"):
        next(receiver.receive(("not", "a handle")))


def test_a_rank_that_does_not_send_only_runs_through_its_tensors():
    taken = []

    def tensors():
        for name, tensor in _weights().items():
            taken.append(name)
            yield name, tensor

    publisher = make_publisher("collective", sender=False)
    assert publisher.publish(tensors(), 1) is None
    assert taken == list(_weights())
    publisher.join(GroupSpec("127.0.0.1", 1, 2, 1, "gloo", 1.0))  # joins nothing


@pytest.mark.parametrize(
    ("transport", "learner_gpus", "generator_gpus", "expected"),
    [
        ("auto", 1, 1, "collective"),
        ("auto", 1, 0, "object_store"),
        ("auto", 0, 0.5, "object_store"),
        ("object_store", 1, 1, "object_store"),
        ("collective", 0, 0, "collective"),
    ],
)
def test_auto_is_collective_when_learner_and_generators_are_on_gpus(
    transport, learner_gpus, generator_gpus, expected
):
    assert resolve_transport(transport, learner_gpus, generator_gpus) == expected


def test_transports_are_made_from_the_resolved_config():
    config = JobConfig.model_validate(
        {
            "model": "m",
            "dataset": {"path": "d.jsonl"},
            "reward": {"function": "rlfleet.reward.functions:sentiment"},
            "weight_sync": {"bucket_mb": 8, "timeout_s": 3},
        }
    )
    resolved = resolved_weight_sync(config)
    assert (resolved.transport, resolved.bucket_mb) == ("object_store", 8)
    publisher = make_publisher(
        WeightSyncConfig(transport="collective", bucket_mb=2), dtype="bfloat16"
    )
    assert isinstance(publisher, CollectivePublisher)
    assert (publisher.bucket_bytes, publisher.dtype) == (2 * 2**20, torch.bfloat16)
    assert isinstance(make_receiver(resolved), TRANSPORTS["object_store"].receiver)
    with pytest.raises(ValueError, match="'auto' must be resolved first"):
        make_receiver(WeightSyncConfig())
