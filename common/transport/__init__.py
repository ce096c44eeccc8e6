"""Weight transports: how each new policy version goes from the learner to every generator.

A transport is a ``Publisher`` on the learner side and a ``Receiver`` on the generator side,
chosen by name from ``TRANSPORTS`` (``weight_sync.transport``; ``resolve_transport`` decides
``auto``). The learner hands ``publish`` its weights as ``(name, full tensor)`` pairs, one at a
time; ``publish`` returns a small, picklable handle (the version, the size, and whatever the
receivers need to find the weights). Every generator's receiver yields the weights as buckets of
``(name, tensor)`` pairs that the generator loads into its engine one by one, then tells the
version it delivered.

Two kinds of transport (``Transport.concurrent``):

- ``object_store`` (common/transport/object_store.py): the learner publishes first, then every
  generator reads the handle's weights, in one bucket.
- ``collective`` (common/transport/collective.py): the learner and the generators form a
  process group (``join``, with a ``GroupSpec`` the job driver serves); in a sync the learner
  broadcasts while every generator receives, bucket by bucket, each side with a deadline.

The driver's side of both is job/sync.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from rlfleet.common.config import JobConfig, WeightSyncConfig
from rlfleet.common.transport.collective import (
    CollectiveError,
    CollectiveHandle,
    CollectivePublisher,
    CollectiveReceiver,
    GroupSpec,
)
from rlfleet.common.transport.object_store import ObjectStorePublisher, ObjectStoreReceiver
from rlfleet.common.transport.packing import Bucket

__all__ = [
    "DEFAULT_TRANSPORT",
    "TRANSPORTS",
    "Bucket",
    "CollectiveError",
    "CollectiveHandle",
    "CollectiveReceiver",
    "GroupSpec",
    "Publisher",
    "Receiver",
    "Transport",
    "WeightLoadError",
    "WeightsHandle",
    "group_backend",
    "make_publisher",
    "make_receiver",
    "resolve_transport",
    "resolved_weight_sync",
    "transport",
]


class WeightsHandle(Protocol):
    @property
    def version(self) -> int | None:
        """The policy version the weights are (None in a collective sync's request to the
        generators: the version travels with the weights)."""

    @property
    def nbytes(self) -> int:
        """The size of the weights published."""


class Publisher(Protocol):
    """The learner's end. Made with ``sender`` False on learner ranks that hold no full
    weights to send: they run through ``publish``'s tensors (a collective gather on a sharded
    learner) and join no group."""

    def join(self, spec: GroupSpec) -> None:
        """(Re)join the weight group ``spec`` names as its rank 0 (nothing to do for the
        object store)."""

    def publish(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> WeightsHandle | None:
        """Make the weights (HF parameter names, full tensors, taken one at a time) reachable
        by every receiver; None on a rank that does not send."""


class Receiver(Protocol):
    """A generator's end."""

    version: int | None
    """The policy version the last complete ``receive`` delivered."""

    def join(self, spec: GroupSpec, rank: int) -> None:
        """(Re)join the weight group ``spec`` names as ``rank``."""

    def receive(self, handle: WeightsHandle) -> Iterator[Bucket]:
        """The weights ``handle`` names, bucket by bucket."""


class WeightLoadError(RuntimeError):
    """The generator's engine could not load received weights: a bug or a mismatch between
    the learner's model and the engine's, never retried."""


@dataclass(frozen=True)
class Transport:
    publisher: type[Publisher]
    receiver: type[Receiver]
    concurrent: bool
    """True: the generators receive while the learner publishes (a collective); False: they
    read the handle ``publish`` returned."""


TRANSPORTS: dict[str, Transport] = {
    "object_store": Transport(ObjectStorePublisher, ObjectStoreReceiver, concurrent=False),
    "collective": Transport(CollectivePublisher, CollectiveReceiver, concurrent=True),
}
DEFAULT_TRANSPORT = "object_store"


def resolve_transport(transport: str, learner_gpus: float, generator_gpus: float) -> str:
    """``weight_sync.transport`` with ``auto`` decided: ``collective`` when the learner and the
    generators are on GPUs (``learner.num_gpus`` and ``generators.num_gpus`` > 0), else
    ``object_store``."""
    if transport != "auto":
        return transport
    return "collective" if learner_gpus > 0 and generator_gpus > 0 else "object_store"


def resolved_weight_sync(job: JobConfig) -> WeightSyncConfig:
    """The job's ``weight_sync`` with ``transport`` resolved (see ``resolve_transport``): what
    the learner's publisher, every generator's receiver and the driver are made with."""
    learner_gpus, generator_gpus = job.learner.num_gpus, job.generators.num_gpus
    name = resolve_transport(job.weight_sync.transport, learner_gpus, generator_gpus)
    return job.weight_sync.model_copy(update={"transport": name})


def group_backend(learner_gpus: float, generator_gpus: float) -> str:
    """The weight group's backend: nccl when both ends are on GPUs, else gloo."""
    return "nccl" if learner_gpus > 0 and generator_gpus > 0 else "gloo"


def transport(name: str) -> Transport:
    if name == "auto":
        raise ValueError("weight transport 'auto' must be resolved first (resolve_transport)")
    if name not in TRANSPORTS:
        raise ValueError(f"unknown weight transport {name!r}; transports are {sorted(TRANSPORTS)}")
    return TRANSPORTS[name]


def _settings(config: WeightSyncConfig | str) -> WeightSyncConfig:
    if isinstance(config, str):
        return WeightSyncConfig.model_construct(transport=config)
    return config


def make_publisher(
    config: WeightSyncConfig | str = DEFAULT_TRANSPORT,
    dtype: str | torch.dtype | None = None,
    sender: bool = True,
) -> Publisher:
    """The learner's end of ``config``'s transport (a resolved ``WeightSyncConfig``, or a
    transport name with default settings). Floating-point tensors are sent in ``dtype`` (the
    generators' engine dtype; None: as they are)."""
    settings = _settings(config)
    cls: Any = transport(settings.transport).publisher
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return cls(bucket_mb=settings.bucket_mb, dtype=dtype, sender=sender)


def make_receiver(config: WeightSyncConfig | str = DEFAULT_TRANSPORT) -> Receiver:
    """A generator's end of ``config``'s transport."""
    return transport(_settings(config).transport).receiver()
