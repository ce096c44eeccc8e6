"""A pool of restartable Ray actors of one role: shard i of a batch goes to actor i.

An actor that dies while it works on a shard is replaced (``on_restart`` then brings the new
one up to date, e.g. with the current weights) and only its shard is sent again; results are
kept per shard, so nothing is counted twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import ray

MAX_DISPATCH_ATTEMPTS = 3
"""A shard is dispatched at most this often before the job gives up."""


@dataclass
class PendingShards:
    """Shards in flight on a pool: object ref -> (shard index, shard), and sends per shard."""

    method: str
    refs: dict[Any, tuple[int, pa.RecordBatch]] = field(default_factory=dict)
    attempts: dict[int, int] = field(default_factory=dict)


class ActorPool:
    """``size`` actors made by ``create(index)``; each has a ``ready()`` method."""

    def __init__(
        self,
        kind: str,
        create: Callable[[int], Any],
        size: int,
        on_restart: Callable[[int, Any], None] | None = None,
    ) -> None:
        self.kind = kind
        self.create = create
        self.on_restart = on_restart
        self.actors = [create(index) for index in range(size)]
        self.restarts = 0

    def wait_ready(self) -> None:
        ray.get([actor.ready.remote() for actor in self.actors])

    def restart(self, index: int) -> None:
        """Replaces actor ``index`` (killing what is left of it) and waits until it is ready."""
        ray.kill(self.actors[index], no_restart=True)
        actor = self.create(index)
        ray.get(actor.ready.remote())
        self.actors[index] = actor
        self.restarts += 1
        if self.on_restart:
            self.on_restart(index, actor)

    def dispatch(self, method: str, shards: Sequence[pa.RecordBatch]) -> PendingShards:
        """Sends ``method(shard i)`` to actor i; ``collect`` gathers the results."""
        pending = PendingShards(method)
        for index, shard in enumerate(shards):
            self._send(pending, index, shard)
        return pending

    def collect(self, pending: PendingShards) -> list[pa.RecordBatch]:
        """Every shard's result in shard order; a dead actor is restarted and its shard sent
        again, at most ``MAX_DISPATCH_ATTEMPTS`` times in all."""
        results: dict[int, pa.RecordBatch] = {}
        while pending.refs:
            [ref], _ = ray.wait(list(pending.refs), num_returns=1)
            index, shard = pending.refs.pop(ref)
            try:
                results[index] = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                if pending.attempts[index] >= MAX_DISPATCH_ATTEMPTS:
                    raise RuntimeError(
                        f"{self.kind} actor {index} died {MAX_DISPATCH_ATTEMPTS} times on rollouts "
                        f"{id_range(shard)}"
                    ) from exc
                self.restart(index)
                self._send(pending, index, shard)
        return [results[index] for index in sorted(results)]

    def call_all(self, method: str, *args: Any) -> list[Any]:
        """``method(*args)`` on every actor; a dead actor is restarted (its ``on_restart`` then
        does what the call was for) and gives None."""
        refs = [getattr(actor, method).remote(*args) for actor in self.actors]
        results = []
        for index, ref in enumerate(refs):
            try:
                results.append(ray.get(ref))
            except ray.exceptions.RayActorError:
                self.restart(index)
                results.append(None)
        return results

    def _send(self, pending: PendingShards, index: int, shard: pa.RecordBatch) -> None:
        pending.attempts[index] = pending.attempts.get(index, 0) + 1
        ref = getattr(self.actors[index], pending.method).remote(shard)
        pending.refs[ref] = (index, shard)


def split_batch(batch: pa.RecordBatch, parts: int) -> list[pa.RecordBatch]:
    """Contiguous shards of near-equal size (no empty ones)."""
    parts = max(1, min(parts, batch.num_rows))
    bounds = np.linspace(0, batch.num_rows, parts + 1).round().astype(int)
    return [batch.slice(lo, hi - lo) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def id_range(batch: pa.RecordBatch) -> str:
    """``"first..last"`` of the batch's rollout ids, for messages."""
    ids = batch.column("rollout_id").to_pylist()
    return f"{min(ids)}..{max(ids)}" if ids else "(none)"
