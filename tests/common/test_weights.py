"""The weight broadcast format: exact round trip, tied weights stored once, shared by Ray."""

from __future__ import annotations

import pytest
import torch

from rlfleet.common.weights import ALIGNMENT, pack_state_dict, unpack


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


def test_round_trip_is_exact_with_names_dtypes_shapes_and_version():
    state = _tied_state_dict()
    version, restored = unpack(pack_state_dict(state, version=5))
    assert version == 5
    assert list(restored) == list(state)
    for name, tensor in state.items():
        assert restored[name].dtype == tensor.dtype
        assert torch.equal(restored[name], tensor), name


def test_tied_tensors_are_stored_once():
    packed = pack_state_dict(_tied_state_dict(), version=1)
    # wte 160 B at 0, h.0.weight 48 B, h.0.bias 6 B, h.0.steps 8 B, each at the next
    # 64-byte boundary; lm_head.weight is wte again
    assert ALIGNMENT == 64
    assert [slot.offset for slot in packed.slots] == [0, 192, 256, 320, 0]
    assert packed.nbytes == 328


def test_unpacked_tensors_view_the_buffer_without_copying():
    packed = pack_state_dict(_tied_state_dict(), version=1)
    _, restored = unpack(packed)
    start = packed.buffer.ctypes.data
    assert restored["wte.weight"].data_ptr() == start
    assert restored["lm_head.weight"].data_ptr() == start


def test_non_tensor_value_is_named():
    with pytest.raises(TypeError, match=r"state_dict\['h.0.bias'\] is a list"):
        pack_state_dict({"h.0.bias": [1.0, 2.0]}, version=1)


@pytest.mark.slow
def test_object_store_readers_get_read_only_shared_buffer(ray_local):
    state = _tied_state_dict()
    ref = ray_local.put(pack_state_dict(state, version=2))
    first, second = ray_local.get(ref), ray_local.get(ref)
    assert not first.buffer.flags.writeable
    assert first.buffer.ctypes.data == second.buffer.ctypes.data
    version, restored = unpack(first)
    assert version == 2
    assert all(torch.equal(restored[name], tensor) for name, tensor in state.items())


def test_unpacking_something_else_is_named():
    with pytest.raises(TypeError, match="expected common.weights.PackedWeights, got dict"):
        unpack({"wte.weight": torch.zeros(2)})
