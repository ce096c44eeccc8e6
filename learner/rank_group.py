"""The learner as a group of rank actors: N ``LearnerActor`` ranks in one Ray placement group.

``start_learner_group`` places the ranks (one bundle each, packed onto as few nodes as fit),
finds rank 0's node address and a free port there for the ranks' ``torch.distributed``
rendezvous, and starts every rank at once. ``LearnerGroup`` offers the driver what one learner
actor offered: each call goes to every rank (all of them take part in the collectives of a step,
a weight publication or a checkpoint) and rank 0's answer is the group's.

No wait on the ranks is unbounded: every call has a deadline (``learner.timeout_s``, the ranks'
own collective deadline, plus ``DEADLINE_MARGIN_S``), and a rank that dies fails the call at once
with one line naming it (``ActorWaitError``). With ``learner.liveness_timeout_s`` the ranks are
pinged while a call is out (``common.waits.Pings``), so a rank that is alive but silent (stopped,
frozen) fails it within that time instead of at the deadline.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlfleet.common import waits
from rlfleet.common.errors import first_line
from rlfleet.common.metrics import MetricsTarget
from rlfleet.common.start_errors import creation_error, strip_ansi

DEADLINE_MARGIN_S = 60.0
"""Added to ``learner.timeout_s`` for the driver's deadline on a call to the ranks: a rank's own
collectives give up after ``timeout_s``, so a stalled group answers (with an error) before."""


@dataclass(frozen=True)
class RankSpec:
    """One rank's place in the learner's process group (learner/rank_group.py makes them)."""

    rank: int
    world_size: int
    master_addr: str
    """Rank 0's node, where the group's rendezvous store listens."""
    master_port: int
    ranks_on_node: int = 1
    """Ranks of the group on this rank's node: they share its cores."""


LEARNER_RANK = "learner rank"
"""How ``wait_all``'s callers name a learner rank: ``learner rank <i>``."""


class ActorWaitError(RuntimeError):
    """An actor waited on (a learner rank, or an actor started with the ranks) died or missed
    its deadline; ``actors`` names the ones that did. ``start_error``: the error the actor's
    constructor raised (``common.start_errors.creation_error``), when that is how it died."""

    def __init__(
        self, message: str, actors: Sequence[str] = (), start_error: str | None = None
    ) -> None:
        super().__init__(message)
        self.actors = tuple(actors)
        self.start_error = start_error

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.actors, self.start_error)

    @property
    def learner_failed(self) -> bool:
        """Whether a learner rank is among the actors that failed (a restart can help)."""
        return any(name.startswith(LEARNER_RANK) for name in self.actors)


def wait_all(
    calls: Sequence[tuple[str, Any]],
    timeout_s: float,
    doing: str,
    pings: waits.Pings | None = None,
) -> list[Any]:
    """The results of ``calls`` (``(actor name, object ref)``) in their order, waiting at most
    ``timeout_s`` for all of them (in slices: ``common.waits``). An actor that died fails the
    wait at once, naming it; at the deadline, every actor that has not answered is named. With
    ``pings`` (keyed by the same names), an actor that stops answering them fails the wait as
    soon as it is ``pings.timeout_s`` late. An actor whose constructor raised is named with that
    error's line (``start_error``). An error the call itself raised (a ``RayTaskError``) is
    raised as it is."""
    deadline = time.monotonic() + timeout_s
    names = {ref: name for name, ref in calls}
    results: dict[Any, Any] = {}
    waiting = [ref for _, ref in calls]

    def check_liveness() -> None:
        stalled = pings.check(names[ref] for ref in waiting) if pings else []
        if stalled:
            raise ActorWaitError(
                f"{', '.join(stalled)}: stalled {doing}: no answer to a liveness ping within "
                f"{pings.timeout_s:g} s (learner.liveness_timeout_s)",
                stalled,
            )

    while waiting:
        done, waiting = waits.wait(waiting, deadline, num_returns=1, between=check_liveness)
        if not done:
            late = [names[ref] for ref in waiting]
            raise ActorWaitError(
                f"{', '.join(late)}: no answer {doing} within {timeout_s:g} s", late
            )
        [ref] = done
        try:
            results[ref] = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            start_error = creation_error(exc)
            raise ActorWaitError(
                f"{names[ref]} died {doing}: {start_error or strip_ansi(first_line(exc))}",
                [names[ref]],
                start_error,
            ) from exc
    return [results[ref] for _, ref in calls]


@dataclass(frozen=True)
class PendingCall:
    """One method called on every rank: rank i's result is ``refs[i]``."""

    method: str
    refs: list[Any]


class LearnerGroup:
    """The learner's ranks (``ranks[i]`` is rank i), and their placement group if they have
    one. Every method calls the same method on every rank and answers rank 0's result."""

    def __init__(
        self,
        ranks: Sequence[Any],
        timeout_s: float,
        placement: PlacementGroup | None = None,
        margin_s: float = DEADLINE_MARGIN_S,
        liveness_timeout_s: float | None = None,
    ) -> None:
        """``liveness_timeout_s``: ping the ranks while a call is outstanding, and fail it when
        one does not answer within that time (``common.waits.Pings``: the ranks' class must be
        made with ``common.waits.LIVENESS_GROUPS``); None: no pings."""
        self.ranks = list(ranks)
        self.timeout_s = timeout_s
        self.placement = placement
        self.margin_s = margin_s
        self.liveness_timeout_s = liveness_timeout_s

    @property
    def deadline_s(self) -> float:
        """How long a call on the ranks may take: ``timeout_s`` plus the margin."""
        return self.timeout_s + self.margin_s

    def call(self, method: str, *args: Any) -> PendingCall:
        """Sends ``method(*args)`` to every rank without waiting (``wait`` gets the answer);
        arguments go into the object store once, not once per rank."""
        if len(self.ranks) > 1:
            args = tuple(ray.put(arg) for arg in args)
        return PendingCall(method, [getattr(rank, method).remote(*args) for rank in self.ranks])

    def wait(self, pending: PendingCall) -> Any:
        """Rank 0's result of ``pending`` once every rank has answered (see ``wait_all``); a
        rank that stops answering liveness pings fails it (not ``ready``: a rank that is still
        starting answers nothing)."""
        calls = [(f"{LEARNER_RANK} {i}", ref) for i, ref in enumerate(pending.refs)]
        pings = None
        if self.liveness_timeout_s is not None and pending.method != "ready":
            ranks = {name: rank for (name, _), rank in zip(calls, self.ranks, strict=False)}
            pings = waits.Pings(ranks, self.liveness_timeout_s)
        return wait_all(calls, self.deadline_s, f"in {pending.method}", pings)[0]

    def run(self, method: str, *args: Any) -> Any:
        """``method(*args)`` on every rank; rank 0's result."""
        return self.wait(self.call(method, *args))

    def ready_calls(self) -> list[tuple[str, Any]]:
        """``(name, ref)`` of each rank's ``ready()``, for a start-up wait shared with other
        actors (``wait_all``)."""
        return [(f"{LEARNER_RANK} {i}", rank.ready.remote()) for i, rank in enumerate(self.ranks)]

    def ready(self) -> int:
        return self.run("ready")

    def step(self, batch: Any) -> dict[str, float]:
        """One training step on every rank (each takes its share of ``batch``); rank 0's stats,
        which the trainer reduces over the ranks."""
        return self.run("step", batch)

    def publish_weights(self) -> Any:
        """Every rank gathers the policy a tensor at a time; rank 0 publishes it: its handle."""
        return self.run("publish_weights")

    def save_checkpoint(self, config: Any, job_state: dict[str, Any]) -> str:
        return self.run("save_checkpoint", config, job_state)

    def wait_for_checkpoint(self) -> str | None:
        return self.run("wait_for_checkpoint")

    def resolve_checkpoint(self, uri: str, config: Any) -> str:
        """The committed checkpoint ``uri`` names (the latest under a root), once rank 0 found
        it to be this job's."""
        return self.ask_rank0("resolve_checkpoint", uri, config)

    def load_checkpoint(self, uri: str, config: Any) -> dict[str, Any]:
        """Every rank loads the checkpoint rank 0 resolves ``uri`` to (the latest under a
        root), so that all of them load the same one; the saved job state."""
        return self.run("load_checkpoint", self.resolve_checkpoint(uri, config), config)

    def newest_committed(self, uris: list[str], config: Any) -> str | None:
        """The newest of ``uris`` (oldest first) that is a committed checkpoint; None if none
        is (a save the ranks did not finish committing is not)."""
        return self.ask_rank0("newest_committed", uris, config)

    def consumed_rollout_ids(self) -> list[int]:
        return self.ask_rank0("consumed_rollout_ids")

    def metrics_target(self) -> MetricsTarget | None:
        """Where the learner serves its metrics: rank 0 only (its stats are the group's)."""
        return self.ask_rank0("metrics_target")

    def ask_rank0(self, method: str, *args: Any) -> Any:
        """``method(*args)`` on rank 0 alone: a question every rank would answer alike, with
        no collective in it."""
        ref = getattr(self.ranks[0], method).remote(*args)
        return self.wait(PendingCall(method, [ref]))

    def kill_ranks(self) -> None:
        """Stops every rank; their placement group stays, for the ranks that replace them (and
        for generators that share their GPUs)."""
        for rank in self.ranks:
            ray.kill(rank, no_restart=True)

    def kill(self) -> None:
        """Stops every rank and frees their placement group."""
        self.kill_ranks()
        if self.placement is not None:
            remove_placement_group(self.placement)


RankFactory = Callable[[RankSpec, PlacementGroupSchedulingStrategy], Any]
"""``create(spec, strategy)``: starts rank ``spec.rank`` with Ray's ``scheduling_strategy``."""


def in_bundle(placement: PlacementGroup, index: int) -> PlacementGroupSchedulingStrategy:
    """Ray's scheduling strategy for an actor in bundle ``index`` of ``placement``."""
    return PlacementGroupSchedulingStrategy(
        placement_group=placement, placement_group_bundle_index=index
    )


def create_placement(bundles: list[dict[str, float]]) -> PlacementGroup:
    """A placement group of ``bundles`` packed onto as few nodes as fit (Ray places it
    asynchronously; ``wait_placed`` waits). Zero amounts are left out of a bundle."""
    bundles = [{name: amount for name, amount in b.items() if amount > 0} for b in bundles]
    return placement_group(bundles, strategy="PACK")


def wait_placed(placement: PlacementGroup, timeout_s: float) -> None:
    """Waits until Ray reserved every bundle; names them and the cluster's resources if not."""
    if not placement.wait(timeout_seconds=timeout_s):
        raise ActorWaitError(
            f"learner: Ray could not reserve the ranks' bundles {placement.bundle_specs} within "
            f"{timeout_s:g} s (the cluster has {ray.cluster_resources()}); lower "
            "learner.num_ranks, num_cpus or num_gpus, or add nodes"
        )


@ray.remote(num_cpus=0)
def rendezvous_address() -> tuple[str, int]:
    """Run in rank 0's bundle: its node's address and a port free there a moment ago."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    return ray.util.get_node_ip_address(), port


def bundle_nodes(placement: PlacementGroup) -> list[str]:
    """The node id of each bundle, in bundle order."""
    table = ray.util.placement_group_table(placement)["bundles_to_node_id"]
    return [table[index] for index in range(len(placement.bundle_specs))]


def start_learner_group(
    create: RankFactory,
    placement: PlacementGroup,
    num_ranks: int,
    timeout_s: float,
    liveness_timeout_s: float | None = None,
) -> LearnerGroup:
    """Starts ``num_ranks`` ranks, rank i in bundle i of ``placement`` (created with
    ``create_placement``), without waiting for them to load (``LearnerGroup.ready_calls``).
    The placement group is removed if they cannot start."""
    try:
        wait_placed(placement, timeout_s)
        address = rendezvous_address.options(scheduling_strategy=in_bundle(placement, 0)).remote()
        [(host, port)] = wait_all([("learner rank 0's node", address)], timeout_s, "at start-up")
    except BaseException:
        remove_placement_group(placement)
        raise
    nodes = bundle_nodes(placement)
    ranks = [
        create(
            RankSpec(rank, num_ranks, host, port, ranks_on_node=nodes.count(nodes[rank])),
            in_bundle(placement, rank),
        )
        for rank in range(num_ranks)
    ]
    return LearnerGroup(ranks, timeout_s, placement, liveness_timeout_s=liveness_timeout_s)
