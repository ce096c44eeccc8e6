"""Weight transports: how each new policy version goes from the learner to every generator.

A transport is a ``Publisher`` on the learner side and a ``Receiver`` on the generator side,
chosen by name from ``TRANSPORTS``. ``publish`` returns a small, picklable handle (the version,
the size, and whatever the receivers need to find the weights); the job driver passes it to every
generator, whose receiver yields the weights as buckets of ``(name, tensor)`` pairs that the
generator loads into its engine one by one. The handle is the metadata that travels first; a
transport decides how many buckets the tensors come in (the object store: one).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol

import torch

from rlfleet.common.transport.object_store import ObjectStorePublisher, ObjectStoreReceiver
from rlfleet.common.transport.packing import Bucket


class WeightsHandle(Protocol):
    @property
    def version(self) -> int:
        """The policy version the weights are."""

    @property
    def nbytes(self) -> int:
        """The size of the weights published."""


class Publisher(Protocol):
    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int) -> WeightsHandle:
        """Make ``state_dict`` (HF parameter names) reachable by every receiver."""


class Receiver(Protocol):
    def receive(self, handle: WeightsHandle) -> Iterator[Bucket]:
        """The weights ``handle`` names, bucket by bucket."""


TRANSPORTS: dict[str, tuple[type[Publisher], type[Receiver]]] = {
    "object_store": (ObjectStorePublisher, ObjectStoreReceiver),
}
DEFAULT_TRANSPORT = "object_store"


def _transport(name: str) -> tuple[type[Publisher], type[Receiver]]:
    if name not in TRANSPORTS:
        raise ValueError(f"unknown weight transport {name!r}; transports are {sorted(TRANSPORTS)}")
    return TRANSPORTS[name]


def make_publisher(name: str = DEFAULT_TRANSPORT) -> Publisher:
    return _transport(name)[0]()


def make_receiver(name: str = DEFAULT_TRANSPORT) -> Receiver:
    return _transport(name)[1]()
