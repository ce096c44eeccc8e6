"""A pool of restartable Ray actors of one role: shard i of a batch goes to actor i.

An actor that dies while it works on a shard is replaced (``on_restart`` then brings the new
one up to date, e.g. with the current weights) and only its shard is sent again; results are
kept per shard, so nothing is counted twice.

No wait on an actor is unbounded. Each shard has a deadline (the pool's ``Deadline``: its role's
timeout plus an allowance per row), and so has each call to every actor (``call_all``), counted
from when the actor can start on it: an actor runs its calls one at a time, so a call sent behind
another is due that long after the one before it. An actor past its deadline is taken for dead
(stalled: stopped, frozen, or hung): one line names it and the deadline, it is killed and
restarted, and its shard is sent again. Every wait runs in slices (``common.waits``), so that a
stop signal takes effect within about a second.

A replacement that dies while it starts is started again, at most ``MAX_START_ATTEMPTS`` times
in a row; one whose constructor fails as the start before it did stops the job at once with that
error, naming the actor (``common.start_errors``): a start that fails twice alike would fail
every time.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from rlfleet.common import waits
from rlfleet.common.errors import first_line
from rlfleet.common.start_errors import (
    ActorCannotStart,
    creation_error,
    stop_if_repeated,
    strip_ansi,
)

logger = logging.getLogger(__name__)

MAX_DISPATCH_ATTEMPTS = 3
"""A shard is dispatched at most this often before the job gives up."""

MAX_START_ATTEMPTS = 3
"""An actor is started at most this often in a row (each start that dies is followed by another)
before the job gives up."""

START_TIMEOUT_S = 660.0
"""How long a pool waits for a new actor to be ready, unless told otherwise."""


@dataclass(frozen=True)
class Deadline:
    """How long an actor of a pool may take for one shard: ``base_s`` plus ``per_row_s`` for each
    of its rows; ``source`` says which settings the numbers come from (for messages)."""

    base_s: float = math.inf
    per_row_s: float = 0.0
    source: str = "no deadline"

    def seconds(self, rows: int) -> float:
        return self.base_s + self.per_row_s * rows

    def describe(self, seconds: float) -> str:
        return f"{seconds:.1f} s ({self.source})"


@dataclass(frozen=True)
class Sent:
    """One shard sent to one actor: what to send again if that actor fails."""

    index: int
    shard: pa.RecordBatch
    actor: Any
    deadline: float
    """When the answer is due (``time.monotonic()``)."""
    limit_s: float
    """The shard's own deadline in seconds (from when the actor could start on it)."""


@dataclass
class PendingShards:
    """Shards in flight on a pool: object ref -> what was sent, and sends per shard."""

    method: str
    refs: dict[Any, Sent] = field(default_factory=dict)
    attempts: dict[int, int] = field(default_factory=dict)


class ActorPool:
    """``size`` actors made by ``create(index)``; each has a ``ready()`` method. ``deadline``:
    how long one shard may take (none by default); ``start_timeout_s``: how long a new actor may
    take to be ready."""

    def __init__(
        self,
        kind: str,
        create: Callable[[int], Any],
        size: int,
        on_restart: Callable[[int, Any], None] | None = None,
        deadline: Deadline | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        self.kind = kind
        self.create = create
        self.on_restart = on_restart
        self.deadline = deadline or Deadline()
        self.start_timeout_s = start_timeout_s
        self.actors = [create(index) for index in range(size)]
        self.restarts = 0
        """Actors replaced (one whose replacement needed several starts counts once)."""
        self._queued: list[dict[Any, float]] = [{} for _ in range(size)]
        """Each actor's calls not known to be done: ref -> when it is due."""

    def wait_ready(self) -> None:
        """Waits until every actor is ready, at most ``start_timeout_s``; names those that are
        not (an actor that died raises what Ray raised)."""
        refs = [actor.ready.remote() for actor in self.actors]
        _, late = waits.wait(refs, time.monotonic() + self.start_timeout_s)
        if late:
            indices = [refs.index(ref) for ref in late]
            raise RuntimeError(
                f"{self.kind} actors {indices} were not ready within {self.start_timeout_s:g} s"
            )
        ray.get(refs)

    def restart(self, index: int, start_error: str | None = None) -> None:
        """Replaces actor ``index`` (``replace``), then ``on_restart`` brings the new one up to
        date."""
        self.replace(index, start_error)
        if self.on_restart:
            self.on_restart(index, self.actors[index])

    def replace(self, index: int, start_error: str | None = None) -> None:
        """Replaces actor ``index`` (killing what is left of it) and waits until the new one is
        ready, at most ``start_timeout_s``. A new one that dies starting is replaced in turn, at
        most ``MAX_START_ATTEMPTS`` starts in all; one whose constructor fails as the start
        before it did (``start_error``: how actor ``index``'s own constructor failed, if it did)
        raises ``ActorCannotStart`` with that error at once."""
        name = f"{self.kind} actor {index}"
        for attempt in range(1, MAX_START_ATTEMPTS + 1):
            ray.kill(self.actors[index], no_restart=True)
            actor = self.create(index)
            self.actors[index] = actor  # from now on, stopping the job stops it too
            self._queued[index] = {}
            try:
                waits.get(actor.ready.remote(), self.start_timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise RuntimeError(
                    f"{name}: its replacement was not ready within {self.start_timeout_s:g} s"
                ) from None
            except ray.exceptions.RayActorError as exc:
                failed = creation_error(exc)
                stop_if_repeated(name, failed, start_error)
                cause = failed or strip_ansi(first_line(exc))
                if attempt == MAX_START_ATTEMPTS:
                    raise ActorCannotStart(
                        f"{name} cannot start: {MAX_START_ATTEMPTS} starts in a row died, the "
                        f"last with {cause}"
                    ) from exc
                logger.warning(
                    "%s died while it started (%s): starting it again (%d of %d starts)",
                    name,
                    cause,
                    attempt + 1,
                    MAX_START_ATTEMPTS,
                )
                start_error = failed
                continue
            self.restarts += 1
            return

    def dispatch(self, method: str, shards: Sequence[pa.RecordBatch]) -> PendingShards:
        """Sends ``method(shard i)`` to actor i; ``collect`` gathers the results."""
        pending = PendingShards(method)
        for index, shard in enumerate(shards):
            self._send(pending, index, shard)
        return pending

    def collect(self, pending: PendingShards) -> list[pa.RecordBatch]:
        """Every shard's result in shard order; an actor that died or is past the shard's
        deadline is restarted and its shard sent again, at most ``MAX_DISPATCH_ATTEMPTS`` times
        in all."""
        results: dict[int, pa.RecordBatch] = {}
        while pending.refs:
            due = min(sent.deadline for sent in pending.refs.values())
            done, _ = waits.wait(list(pending.refs), due, num_returns=1)
            for ref in done:
                sent = pending.refs.pop(ref)
                self._queued[sent.index].pop(ref, None)
                try:
                    results[sent.index] = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    self._send_again(pending, sent, exc)
            for ref in overdue({ref: sent.deadline for ref, sent in pending.refs.items()}):
                self._send_again(pending, pending.refs.pop(ref), None)
        return [results[index] for index in sorted(results)]

    def call_all(
        self, method: str, *args: Any, timeout_s: float = math.inf, source: str = ""
    ) -> list[Any]:
        """``method(*args)`` on every actor, each due ``timeout_s`` (``source`` names the
        setting) after the calls queued before it on that actor; an actor that died or is past
        its deadline (one line names it) is restarted (its ``on_restart`` then does what the
        call was for) and gives None."""
        calls: dict[Any, tuple[int, Any, float]] = {}
        for index, actor in enumerate(self.actors):
            ref = getattr(actor, method).remote(*args)
            calls[ref] = (index, actor, self._queue(index, ref, timeout_s))
        results: list[Any] = [None] * len(self.actors)
        waiting = dict(calls)
        while waiting:
            due = min(deadline for _, _, deadline in waiting.values())
            done, _ = waits.wait(list(waiting), due)
            for ref in done:
                index, actor, _ = waiting.pop(ref)
                self._queued[index].pop(ref, None)
                try:
                    results[index] = ray.get(ref)
                except ray.exceptions.RayActorError:
                    if actor is self.actors[index]:
                        self.restart(index)
            for ref in overdue({ref: deadline for ref, (_, _, deadline) in waiting.items()}):
                index, actor, _ = waiting.pop(ref)
                if actor is self.actors[index]:
                    limit = f"{timeout_s:g} s ({source})" if source else f"{timeout_s:g} s"
                    self._stalled(index, f"{method} within {limit}", "")
        return results

    def _send(self, pending: PendingShards, index: int, shard: pa.RecordBatch) -> None:
        pending.attempts[index] = pending.attempts.get(index, 0) + 1
        actor = self.actors[index]
        ref = getattr(actor, pending.method).remote(shard)
        limit_s = self.deadline.seconds(shard.num_rows)
        pending.refs[ref] = Sent(index, shard, actor, self._queue(index, ref, limit_s), limit_s)

    def _send_again(
        self, pending: PendingShards, sent: Sent, died: ray.exceptions.RayActorError | None
    ) -> None:
        """Sends ``sent``'s shard again after its actor died (``died``) or missed the deadline:
        to the actor now at its index (restarted first, unless it was replaced meanwhile)."""
        index, shard = sent.index, sent.shard
        if sent.actor is not self.actors[index]:  # replaced meanwhile (e.g. by ``call_all``)
            self._send(pending, index, shard)
            return
        what = f"{pending.method} within {self.deadline.describe(sent.limit_s)}"
        if pending.attempts[index] >= MAX_DISPATCH_ATTEMPTS:
            failed = "died" if died else "did not answer in time"
            raise RuntimeError(
                f"{self.kind} actor {index} {failed} {MAX_DISPATCH_ATTEMPTS} times on rollouts "
                f"{id_range(shard)}" + ("" if died else f" (the last time: {what})")
            ) from died
        if died:
            self.restart(index)
        else:
            self._stalled(index, what, f", its shard (rollouts {id_range(shard)}) sent again")
        self._send(pending, index, shard)

    def _stalled(self, index: int, what: str, then: str) -> None:
        logger.warning(
            "%s actor %d did not answer %s: taken for stalled, killed and restarted%s",
            self.kind,
            index,
            what,
            then,
        )
        self.restart(index)

    def _queue(self, index: int, ref: Any, limit_s: float) -> float:
        """When call ``ref`` just sent to actor ``index`` is due: ``limit_s`` after the calls
        queued before it there are due (an actor runs its calls one at a time), or from now."""
        queued = self._queued[index]
        if queued:
            done, _ = ray.wait(list(queued), num_returns=len(queued), timeout=0)
            for earlier in done:
                del queued[earlier]
        deadline = max([time.monotonic(), *queued.values()]) + limit_s
        queued[ref] = deadline
        return deadline


def overdue(deadlines: dict[Any, float]) -> list[Any]:
    """The refs of ``deadlines`` (ref -> when due, ``time.monotonic()``) that are due and not
    done."""
    now = time.monotonic()
    due = [ref for ref, deadline in deadlines.items() if deadline <= now]
    if not due:
        return []
    done, _ = ray.wait(due, num_returns=len(due), timeout=0)
    return [ref for ref in due if ref not in done]


def split_batch(batch: pa.RecordBatch, parts: int) -> list[pa.RecordBatch]:
    """Contiguous shards of near-equal size (no empty ones)."""
    parts = max(1, min(parts, batch.num_rows))
    bounds = np.linspace(0, batch.num_rows, parts + 1).round().astype(int)
    return [batch.slice(lo, hi - lo) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def id_range(batch: pa.RecordBatch) -> str:
    """``"first..last"`` of the batch's rollout ids, for messages."""
    ids = batch.column("rollout_id").to_pylist()
    return f"{min(ids)}..{max(ids)}" if ids else "(none)"
