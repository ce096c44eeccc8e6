"""Weight transports: the packed format (exact round trip, tied weights stored once, views of
one buffer) and the object store's publisher and receiver, selected by name."""

from __future__ import annotations

import pytest
import torch

from rlfleet.common.transport import (
    DEFAULT_TRANSPORT,
    TRANSPORTS,
    make_publisher,
    make_receiver,
)
from rlfleet.common.transport.object_store import (
    ObjectStoreHandle,
    ObjectStorePublisher,
    ObjectStoreReceiver,
)
from rlfleet.common.transport.packing import ALIGNMENT, pack_state_dict, unpack


def _tied_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    embedding = torch.randn(10, 4)
    return {
        "wte.weight": embedding,
        "h.0.weight": torch.randn(4, 3).t(),
        "h.0.bias": torch.randn(3, dtype=torch.bfloat16),
        "h.0.steps": torch.tensor([7], dtype=torch.int64),
        "lm_head.weight": embedding,
    }


def assert_same_named_tensors(named: list[tuple[str, torch.Tensor]], state: dict) -> None:
    assert [name for name, _ in named] == list(state)
    for name, tensor in named:
        assert tensor.dtype == state[name].dtype, name
        assert torch.equal(tensor, state[name]), name


def test_round_trip_is_exact_with_names_dtypes_shapes_and_version():
    state = _tied_state_dict()
    packed = pack_state_dict(state, version=5)
    assert packed.version == 5
    assert_same_named_tensors(unpack(packed), state)


def test_tied_tensors_are_stored_once():
    packed = pack_state_dict(_tied_state_dict(), version=1)
    # wte 160 B at 0, h.0.weight 48 B, h.0.bias 6 B, h.0.steps 8 B, each at the next
    # 64-byte boundary; lm_head.weight is wte again
    assert ALIGNMENT == 64
    assert [slot.offset for slot in packed.slots] == [0, 192, 256, 320, 0]
    assert packed.nbytes == 328


def test_unpacked_tensors_view_the_buffer_without_copying():
    packed = pack_state_dict(_tied_state_dict(), version=1)
    restored = dict(unpack(packed))
    start = packed.buffer.ctypes.data
    assert restored["wte.weight"].data_ptr() == start
    assert restored["lm_head.weight"].data_ptr() == start


def test_non_tensor_value_is_named():
    with pytest.raises(TypeError, match=r"state_dict\['h.0.bias'\] is a list"):
        pack_state_dict({"h.0.bias": [1.0, 2.0]}, version=1)


def test_unpacking_something_else_is_named():
    with pytest.raises(TypeError, match="expected a PackedWeights, got dict"):
        unpack({"wte.weight": torch.zeros(2)})


def test_transports_are_selected_by_name():
    assert DEFAULT_TRANSPORT == "object_store"
    assert isinstance(make_publisher("object_store"), ObjectStorePublisher)
    assert isinstance(make_receiver(), ObjectStoreReceiver)
    with pytest.raises(ValueError, match=f"unknown weight transport 'nccl'.*{sorted(TRANSPORTS)}"):
        make_receiver("nccl")


def test_object_store_receiver_refuses_another_transports_handle():
    with pytest.raises(TypeError, match="expected an ObjectStoreHandle, got tuple"):
        next(ObjectStoreReceiver().receive((1, None)))


@pytest.mark.slow
def test_object_store_publishes_once_and_receivers_get_one_bucket_of_the_shared_buffer(
    ray_local,
):
    state = _tied_state_dict()
    handle = ObjectStorePublisher().publish(state, version=2)
    assert (handle.version, handle.nbytes) == (2, 328)
    first, second = (list(ObjectStoreReceiver().receive(handle)) for _ in range(2))
    assert len(first) == len(second) == 1
    assert_same_named_tensors(first[0], state)
    # both readers view the same read-only shared memory, tied weights once
    (_, wte), *_, (_, lm_head) = first[0]
    assert wte.data_ptr() == second[0][0][1].data_ptr() == lm_head.data_ptr()
    packed = ray_local.get(handle.ref)
    assert not packed.buffer.flags.writeable


@pytest.mark.slow
def test_object_store_receiver_checks_the_version_it_is_told(ray_local):
    packed = pack_state_dict(_tied_state_dict(), version=3)
    handle = ObjectStoreHandle(version=4, nbytes=packed.nbytes, ref=ray_local.put(packed))
    with pytest.raises(ValueError, match="handle says version 4, weights are 3"):
        next(ObjectStoreReceiver().receive(handle))
