"""Weight sync from the driver's side: when the generators need the learner's new policy, and
getting it to every one of them (a restarted generator included).

The learner publishes each version once; every generator loads it and answers the version it
now holds. How the weights travel is the transport's business (common/transport/):

- object store: the learner publishes (``publish_weights`` returns a handle with its
  ``version``), then every generator loads that handle.
- collective: the learner and every generator form one process group (``join_weight_group``;
  this driver serves the group's ``TCPStore``), and in a sync the learner's broadcast and every
  generator's receive run at once. Every member works to a deadline (``weight_sync.timeout_s``)
  and so does this driver: a generator that died or did not answer by then is named, restarted
  (the pool's restart, so the job counts it) and the group is formed again with the new one;
  then the whole sync runs again. Generators that only failed because a peer did are not
  restarted; one that failed on its own (its engine's workers died) is. An engine that cannot
  load the weights stops the job. A tensor-parallel generator's engine workers are ranks of the
  group of their own (``ranks_per_generator``: generator ``i``'s first is ``1 + i * size``).

Through the object store, a generator that has not loaded the weights within
``weight_sync.timeout_s`` (after what it was doing before) is killed and restarted, and loads them
anew (``ActorPool.call_all``). Published weights that are gone from the object store
(``OwnerDiedError``, ``ObjectLostError``: ``weights_lost``) mean that their owner, learner rank 0,
died: that is the learner's failure (``ActorWaitError``: the job restarts the learner, publishes
again and syncs again), not the engine's.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, replace
from typing import Any

import ray

from rlfleet.common import waits
from rlfleet.common.config import JobConfig, WeightSyncConfig
from rlfleet.common.errors import error_line
from rlfleet.common.transport import (
    CollectiveError,
    CollectiveHandle,
    GroupSpec,
    WeightLoadError,
    WeightsHandle,
    group_backend,
    transport,
)
from rlfleet.job.pool import ActorPool
from rlfleet.learner.rank_group import LEARNER_RANK, ActorWaitError

logger = logging.getLogger(__name__)

MAX_SYNC_ATTEMPTS = 3
"""A collective sync is tried at most this often (each failed try restarts the generators
to blame) before the job gives up."""

REPORT_GRACE_S = 2.0
"""How long past the deadline the driver waits for members to report their own failure (they
give up at the deadline; Ray takes a moment to carry the error back)."""


def needs_sync(
    iteration: int, generators_version: int, max_policy_lag: int, one_step_off: bool
) -> bool:
    """Whether rollouts sampled next with ``generators_version`` would lag more than
    ``max_policy_lag`` versions behind the learner that trains on them: the learner is at
    version ``iteration`` (one more in one-step-off mode, where they are trained on after the
    next step)."""
    trained_at = iteration + int(one_step_off)
    return trained_at - generators_version > max_policy_lag


@dataclass
class Outcome:
    """What became of one remote call within a deadline: its result, its error, or neither
    (it did not answer)."""

    done: bool = False
    result: Any = None
    error: BaseException | None = None

    @property
    def died(self) -> bool:
        return isinstance(self.error, ray.exceptions.RayActorError)


LOST_OBJECT = re.compile(
    r"\b(OwnerDiedError|ObjectLostError|ObjectFetchTimedOutError|ReferenceCountingAssertionError"
    r"|ObjectReconstructionFailed\w*Error)\b"
)
"""Ray's errors for an object gone from the object store (``ray.exceptions.ObjectLostError`` and
its subclasses), by name: for an error that names one in its text (a generator's
``WeightLoadError`` around what its ``ray.get`` raised)."""


def weights_lost(error: BaseException) -> bool:
    """Whether ``error``, or an error it wraps, says that an object is gone from the object
    store: for published weights, that their owner (learner rank 0) died."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ray.exceptions.ObjectLostError) or LOST_OBJECT.search(str(current)):
            return True
        if isinstance(current, ray.exceptions.RayTaskError) and current.cause is not current:
            current = current.cause
        else:
            current = current.__cause__ or current.__context__
    return False


def lost_weights_error(error: BaseException, doing: str) -> ActorWaitError:
    """The learner's failure that ``error`` (``weights_lost``) stands for, naming rank 0."""
    return ActorWaitError(
        f"weight sync: the published weights were lost {doing}: their owner, learner rank 0, "
        f"died ({error_line(error)})",
        [f"{LEARNER_RANK} 0"],
    )


def wait_outcomes(refs: list[Any], deadline: float) -> list[Outcome]:
    """Each ref's outcome once it finished or the deadline passed (``time.monotonic()``),
    waiting in slices (``common.waits``)."""
    _, pending = waits.wait(refs, deadline)
    outcomes = []
    for ref in refs:
        if ref in pending:
            outcomes.append(Outcome())
            continue
        try:
            outcomes.append(Outcome(done=True, result=ray.get(ref)))
        except Exception as exc:  # noqa: BLE001 - the caller judges each failure
            outcomes.append(Outcome(done=True, error=exc))
    return outcomes


def learner_outcome(ranks: list[Outcome]) -> Outcome:
    """The learner's outcome from its ranks': the first failure, else not done if one is not,
    else rank 0's result."""
    failed = [outcome for outcome in ranks if outcome.error is not None]
    if failed:
        return failed[0]
    if not all(outcome.done for outcome in ranks):
        return Outcome()
    return ranks[0]


@dataclass(frozen=True)
class SyncFailure:
    """One failed try of a collective sync: the generators to blame (index -> what happened;
    none when no generator caused it) and every member's error."""

    doing: str
    blamed: dict[int, str]
    errors: list[str]
    seconds: float = 0.0
    """How long the try took until it was judged failed."""

    def __str__(self) -> str:
        named = "; ".join(f"generator {i} {why}" for i, why in self.blamed.items())
        return (
            f"{self.doing}: {named or 'no generator to blame'} after {self.seconds:.1f} s "
            f"(errors: {self.errors})"
        )


@dataclass
class WeightGroupServer:
    """The rendezvous of one weight group: a ``TCPStore`` this driver serves, and the
    generator actors (by identity) the group was formed with."""

    spec: GroupSpec
    store: Any
    members: list[Any]

    def is_of(self, generators: list[Any]) -> bool:
        return len(generators) == len(self.members) and all(
            a is b for a, b in zip(generators, self.members, strict=True)
        )


def serve_weight_group(
    group_id: int, world_size: int, backend: str, timeout_s: float
) -> tuple[GroupSpec, Any]:
    """A new ``TCPStore`` on a free port of this node's address only (loopback for a local
    job), and the spec members join it with."""
    from datetime import timedelta

    from rlfleet.common.transport.rendezvous import listening_store

    host = ray.util.get_node_ip_address()
    store = listening_store(
        host, 0, world_size, timedelta(seconds=timeout_s), wait_for_workers=False
    )
    return GroupSpec(host, store.port, world_size, group_id, backend, timeout_s), store


class WeightSync:
    """The learner's latest published weights, and the generators that must hold them."""

    def __init__(
        self,
        learner: Any,
        config: WeightSyncConfig | None = None,
        backend: str = "gloo",
        ranks_per_generator: int = 1,
    ) -> None:
        """``learner``: the learner's ranks (a ``learner.group.LearnerGroup``); ``config``: the
        job's resolved ``weight_sync`` (None: the object store); ``backend``: the collective's
        (``common.transport.group_backend``); ``ranks_per_generator``: the weight group ranks
        each generator takes (its engine's tensor-parallel workers)."""
        self.learner = learner
        self.config = config or WeightSyncConfig(transport="object_store")
        self.backend = backend
        self.ranks_per_generator = ranks_per_generator
        self.concurrent = transport(self.config.transport).concurrent
        self.handle: WeightsHandle | None = None
        self.failures: list[SyncFailure] = []
        """Every failed collective try."""
        self._group: WeightGroupServer | None = None
        self._groups_formed = 0
        self._generators: ActorPool | None = None
        self._syncing = False

    @classmethod
    def from_config(
        cls, learner: Any, config: JobConfig, weight_sync: WeightSyncConfig
    ) -> WeightSync:
        """The job's sync: through ``weight_sync`` (the job's resolved ``weight_sync``), in a
        group of the backend and ranks ``config`` places the learner and generators on."""
        backend = group_backend(config.learner.num_gpus, config.generators.num_gpus)
        ranks = config.generators.tensor_parallel_size
        return cls(learner, weight_sync, backend, ranks)

    @property
    def version(self) -> int:
        """The policy version every generator holds (0: the model directory's weights)."""
        return 0 if self.handle is None else int(self.handle.version)

    def publish(self, generators: ActorPool) -> None:
        """Publishes the learner's policy once and waits until every generator holds it (a
        generator that died meanwhile gets it from ``load_into_restarted``)."""
        if self.concurrent:
            self._generators = generators
            self._sync_until_done(generators)
            return
        self.handle = self.learner.publish_weights()
        try:
            versions = generators.call_all(
                "load_weights",
                self.handle,
                timeout_s=self.config.timeout_s,
                source="weight_sync.timeout_s",
            )
        except Exception as exc:
            if weights_lost(exc):
                raise lost_weights_error(exc, "while the generators loaded them") from exc
            raise
        for index, version in enumerate(versions):
            if version is not None:
                self._check_version(index, version)

    def load_into_restarted(self, index: int, generator: Any) -> None:
        """A restarted generator starts from the model directory: give it the current policy.
        Collective: the group is formed again with it, and the current policy goes to every
        generator (unless a sync is under way: it does that itself)."""
        if self.handle is None:
            return
        if not self.concurrent:
            timeout_s = self.config.timeout_s
            try:
                version = waits.get(generator.load_weights.remote(self.handle), timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise RuntimeError(
                    f"generator {index} was restarted and did not load the published weights "
                    f"within weight_sync.timeout_s ({timeout_s:g} s)"
                ) from None
            except Exception as exc:
                if weights_lost(exc):
                    raise lost_weights_error(exc, "as a restarted generator loaded them") from exc
                raise
            self._check_version(index, version)
        elif not self._syncing and self._generators is not None:
            self._sync_until_done(self._generators)

    # -- the collective ------------------------------------------------------------------------

    def _sync_until_done(self, generators: ActorPool) -> None:
        self._syncing = True
        try:
            for attempt in range(1, MAX_SYNC_ATTEMPTS + 1):
                started = time.monotonic()
                failure = self._sync_once(generators.actors)
                if failure is None:
                    return
                failure = replace(failure, seconds=time.monotonic() - started)
                self.failures.append(failure)
                logger.warning(
                    "weight sync try %d of %d failed: %s", attempt, MAX_SYNC_ATTEMPTS, failure
                )
                if attempt < MAX_SYNC_ATTEMPTS:
                    for index in failure.blamed:
                        generators.restart(index)
        finally:
            self._syncing = False
        raise RuntimeError(
            f"weight sync failed {MAX_SYNC_ATTEMPTS} times: "
            + "; ".join(map(str, self.failures[-MAX_SYNC_ATTEMPTS:]))
        )

    def _sync_once(self, generators: list[Any]) -> SyncFailure | None:
        """One try: (re)form the group if its members changed, then broadcast. None when every
        generator holds the learner's version."""
        failure = self._await_idle(generators)
        if failure is not None:
            return failure
        if self._group is None or not self._group.is_of(generators):
            failure = self._form_group(generators)
            if failure is not None:
                return failure
        assert self._group is not None
        request = CollectiveHandle(self._group.spec.group_id)
        outcomes = self._run_all(
            "publish_weights", (), [g.load_weights.remote(request) for g in generators]
        )
        failure = self._judge(*outcomes, doing="syncing weights")
        if failure is not None:
            self._group = None
            return failure
        learner, *received = outcomes
        self.handle = learner.result
        for index, outcome in enumerate(received):
            self._check_version(index, outcome.result)
        return None

    def _run_all(
        self, learner_method: str, args: tuple, generator_refs: list[Any]
    ) -> list[Outcome]:
        """``learner_method(*args)`` on every learner rank, at the same time as the generator
        calls already sent; the learner's outcome (rank 0's result, or the first rank's
        failure) then each generator's, within the deadline."""
        ranks = self.learner.call(learner_method, *args).refs
        deadline = time.monotonic() + self.config.timeout_s + REPORT_GRACE_S
        outcomes = wait_outcomes([*ranks, *generator_refs], deadline)
        return [learner_outcome(outcomes[: len(ranks)]), *outcomes[len(ranks) :]]

    def _await_idle(self, generators: list[Any]) -> SyncFailure | None:
        """Waits (up to the deadline) until every generator has finished what it was doing,
        e.g. the batch it samples in one-step-off mode, so that the sync's own deadline starts
        when every member can take part at once."""
        outcomes = self._run_all("ready", (), [g.ready.remote() for g in generators])
        return self._judge(*outcomes, doing="finishing earlier calls")

    def _form_group(self, generators: list[Any]) -> SyncFailure | None:
        """A new group of the learner (rank 0) and ``generators`` (generator ``i`` from rank
        ``1 + i * ranks_per_generator``), on a new port."""
        self._group = None
        self._groups_formed += 1
        size = self.ranks_per_generator
        spec, store = serve_weight_group(
            self._groups_formed, 1 + size * len(generators), self.backend, self.config.timeout_s
        )
        joins = [g.join_weight_group.remote(spec, 1 + i * size) for i, g in enumerate(generators)]
        outcomes = self._run_all("join_weight_group", (spec,), joins)
        failure = self._judge(*outcomes, doing="joining the weight group")
        if failure is None:
            self._group = WeightGroupServer(spec, store, list(generators))
        return failure

    def _judge(self, learner: Outcome, *generators: Outcome, doing: str) -> SyncFailure | None:
        """None when every member succeeded. Generators that died, did not answer in time or
        failed on their own (not through the group: e.g. their engine's workers died) are to
        blame; one that failed while every other member succeeded is too. An engine that could
        not load the weights, and a learner that failed on its own, stop the job."""
        for outcome in generators:
            if outcome.error is not None and weights_lost(outcome.error):
                raise lost_weights_error(outcome.error, doing) from outcome.error
            if isinstance(outcome.error, WeightLoadError):
                raise RuntimeError(f"weight sync: {outcome.error}") from outcome.error
        if (
            learner.done
            and learner.error is None
            and all(o.done and not o.error for o in generators)
        ):
            return None
        blamed = {
            index: why for index, o in enumerate(generators) if (why := self._fault(o, doing))
        }
        if not blamed:
            self._check_learner(learner, doing)
            if learner.error is None:
                blamed = {
                    i: f"failed {doing}: {error_line(o.error)}"
                    for i, o in enumerate(generators)
                    if o.error
                }
        errors = [error_line(o.error) for o in (learner, *generators) if o.error]
        return SyncFailure(doing, blamed, errors)

    def _fault(self, outcome: Outcome, doing: str) -> str | None:
        if outcome.died:
            return f"died while {doing}"
        if not outcome.done:
            limit = f"weight_sync.timeout_s ({self.config.timeout_s:g} s)"
            return f"did not answer within {limit} while {doing}"
        if outcome.error is not None and not isinstance(outcome.error, CollectiveError):
            return f"failed {doing}: {error_line(outcome.error)}"
        return None

    def _check_learner(self, learner: Outcome, doing: str) -> None:
        """A learner that died or did not answer raises ``ActorWaitError`` (the job restarts it,
        job/loop.py); one that failed on its own stops the job."""
        if not learner.done:
            raise ActorWaitError(
                f"weight sync: the learner did not finish {doing} within "
                f"weight_sync.timeout_s ({self.config.timeout_s:g} s) and no generator failed"
            )
        if learner.died:
            raise ActorWaitError(
                f"weight sync: a learner rank died {doing}: {error_line(learner.error)}"
            ) from learner.error
        if learner.error is not None and not isinstance(learner.error, CollectiveError):
            raise RuntimeError(f"weight sync: the learner failed {doing}") from learner.error

    def _check_version(self, index: int, version: int) -> None:
        if version != self.version:
            raise RuntimeError(
                f"generator {index} holds policy version {version}, expected {self.version}"
            )
