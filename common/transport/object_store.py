"""The object-store weight transport: pack once, ``ray.put`` once, every generator reads it.

The learner packs its policy's state dict (``packing.pack_state_dict``) and puts it in Ray's
object store once; the handle holds the ``ObjectRef`` inside a dataclass, so Ray passes it by
reference and never inlines the weights into the call. Generators on the learner's node read the
one shared-memory copy without copying it; one on another node pulls it once. The weights arrive
as one bucket.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
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
    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int) -> ObjectStoreHandle:
        packed = pack_state_dict(state_dict, version)
        return ObjectStoreHandle(version=packed.version, nbytes=packed.nbytes, ref=ray.put(packed))


class ObjectStoreReceiver:
    def receive(self, handle: ObjectStoreHandle) -> Iterator[Bucket]:
        if not isinstance(handle, ObjectStoreHandle):
            raise TypeError(f"expected an ObjectStoreHandle, got {type(handle).__name__}")
        packed: PackedWeights = ray.get(handle.ref)
        if packed.version != handle.version:
            raise ValueError(f"handle says version {handle.version}, weights are {packed.version}")
        yield unpack(packed)
