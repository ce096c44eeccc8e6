"""The packed weight format: a state dict copied into one flat byte buffer plus an index.

Ray's object store hands numpy arrays to readers on the same node as read-only views of shared
memory (no copy per reader), so a packed version is one ``numpy.uint8`` buffer and a small index
of ``(name, dtype, shape, offset)`` slots. ``unpack`` returns tensors that are views of that
buffer: loading them into a model copies them once, into the model.

Tensors that share storage (tied embeddings: ``transformer.wte.weight`` and
``lm_head.weight``) are stored once and indexed under both names.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

ALIGNMENT = 64
"""Byte alignment of every tensor in the buffer, so that each view is aligned for its dtype."""

Bucket = list[tuple[str, torch.Tensor]]
"""Named tensors (Hugging Face parameter names) that a generator loads into its engine at once."""


@dataclass(frozen=True)
class TensorSlot:
    name: str
    dtype: str
    """The torch dtype's name, e.g. ``"float32"`` or ``"bfloat16"`` (numpy has no bfloat16)."""
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class PackedWeights:
    """One policy version's weights: a flat byte buffer and where each tensor lies in it."""

    version: int
    buffer: np.ndarray
    slots: tuple[TensorSlot, ...]

    @property
    def nbytes(self) -> int:
        return int(self.buffer.nbytes)


def _aligned(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


def _storage_key(tensor: torch.Tensor) -> tuple[int, tuple[int, ...], tuple[int, ...], str]:
    """Two tensors with the same key hold the same bytes (a tied weight seen twice)."""
    return tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), str(tensor.dtype)


def _plan_slots(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[list[TensorSlot], dict[int, torch.Tensor], int]:
    """Slots for every name, the tensors to copy by offset, and the buffer size."""
    slots: list[TensorSlot] = []
    to_copy: dict[int, torch.Tensor] = {}
    offset_of: dict[tuple, int] = {}
    end = 0
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state_dict[{name!r}] is a {type(tensor).__name__}, not a tensor")
        key = _storage_key(tensor)
        if key not in offset_of:
            offset_of[key] = _aligned(end)
            end = offset_of[key] + tensor.numel() * tensor.element_size()
            to_copy[offset_of[key]] = tensor
        slots.append(
            TensorSlot(
                name=name,
                dtype=str(tensor.dtype).removeprefix("torch."),
                shape=tuple(tensor.shape),
                offset=offset_of[key],
                nbytes=tensor.numel() * tensor.element_size(),
            )
        )
    return slots, to_copy, end


@torch.no_grad()
def pack_state_dict(state_dict: Mapping[str, torch.Tensor], version: int) -> PackedWeights:
    """Copy ``state_dict`` (on any device) into one CPU byte buffer tagged with ``version``.

    The copies are numpy slice assignments, single-threaded memcpy: torch's multi-threaded
    copy is 10-100x slower on a loaded 2-core machine (its OpenMP threads wait on each other).
    """
    slots, to_copy, size = _plan_slots(state_dict)
    buffer = np.empty(size, dtype=np.uint8)
    for offset, tensor in to_copy.items():
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        buffer[offset : offset + raw.size] = raw
    return PackedWeights(version=int(version), buffer=buffer, slots=tuple(slots))


def _view(buffer: torch.Tensor, slot: TensorSlot) -> torch.Tensor:
    dtype = getattr(torch, slot.dtype)
    return buffer[slot.offset : slot.offset + slot.nbytes].view(dtype).view(slot.shape)


def unpack(packed: PackedWeights) -> Bucket:
    """Every ``(name, tensor)`` of ``packed`` in packing order, tensors viewing its buffer
    (no copy).

    From the Ray object store the buffer is read-only shared memory: load the tensors into a
    model (which copies them) and never write to them. torch cannot mark a tensor read-only and
    warns about such buffers; that warning is silenced here because of this contract.
    """
    if not isinstance(packed, PackedWeights):
        raise TypeError(f"expected a PackedWeights, got {type(packed).__name__}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
        buffer = torch.from_numpy(packed.buffer)
    return [(slot.name, _view(buffer, slot)) for slot in packed.slots]
