"""The object-store weight transport: pack once, ``ray.put`` once, every generator reads it.

The learner packs its policy's state dict (``packing.pack_state_dict``) and puts it in Ray's
object store once; the handle holds the ``ObjectRef`` inside a dataclass, so Ray passes it by
reference and never inlines the weights into the call. Generators on the learner's node read the
one shared-memory copy without copying it; one on another node pulls it once. The weights arrive
as one bucket. There is no group to join.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import ray
import torch

from rlfleet.common.transport.packing import Bucket, PackedWeights, pack_state_dict, unpack


@dataclass(frozen=True)
class ObjectStoreHandle:
    version: int
    nbytes: int
    """Size of the packed weights."""
    ref: ray.ObjectRef
    """The ``PackedWeights`` in the object store."""


class ObjectStorePublisher:
    """``bucket_mb`` and ``dtype`` are the collective's settings: the object store packs the
    tensors as they are, in one buffer. ``sender`` False: ``publish`` only runs through them."""

    def __init__(
        self, bucket_mb: float = 0.0, dtype: torch.dtype | None = None, sender: bool = True
    ) -> None:
        self.sender = sender

    def join(self, spec: object) -> None:
        """Nothing to join: every generator reads the object store."""

    def publish(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
        version: int,
    ) -> ObjectStoreHandle | None:
        pairs = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
        if not self.sender:
            for _ in pairs:
                pass
            return None
        packed = pack_state_dict(dict(pairs), version)
        return ObjectStoreHandle(version=packed.version, nbytes=packed.nbytes, ref=ray.put(packed))


class ObjectStoreReceiver:
    def __init__(self) -> None:
        self.version: int | None = None
        """The version the last complete ``receive`` delivered."""

    def join(self, spec: object, rank: int) -> None:
        """Nothing to join: the weights are read from the object store."""

    def receive(self, handle: ObjectStoreHandle) -> Iterator[Bucket]:
        if not isinstance(handle, ObjectStoreHandle):
            raise TypeError(f"expected an ObjectStoreHandle, got {type(handle).__name__}")
        packed: PackedWeights = ray.get(handle.ref)
        if packed.version != handle.version:
            raise ValueError(f"handle says version {handle.version}, weights are {packed.version}")
        yield unpack(packed)
        self.version = packed.version
