"""Tensors of a sharded (FSDP2) or plain model and optimizer as one safetensors file per rank,
read back onto any number of ranks.

Rank ``r`` of ``N`` writes ``<kind>.rank-<r>-of-<N>.safetensors`` with the parts of the tensors it
holds (its DTensor shards; a plain tensor, which every rank holds whole, only from rank 0) and
``<kind>.rank-<r>-of-<N>.json``: every tensor's full shape and dtype and, for the ones in this
rank's file, where its part lies in the full tensor (``offsets`` and ``sizes`` per dimension).

:class:`ShardReader` fills tensors of any layout (the shards of ``M`` ranks, or whole plain
tensors) by copying the slices of the saved parts that overlap each one: it reads only those
slices (``safe_open(...).get_slice``) and opens only the files that hold them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


class CheckpointError(RuntimeError):
    """A checkpoint is missing, uncommitted, corrupt, or does not fit the trainer."""


def rank_file_stem(kind: str, rank: int, world_size: int) -> str:
    return f"{kind}.rank-{rank:05d}-of-{world_size:05d}"


def rank_file_names(kind: str, world_size: int) -> list[str]:
    """Every file that ``world_size`` ranks write for ``kind``."""
    return [
        rank_file_stem(kind, rank, world_size) + suffix
        for rank in range(world_size)
        for suffix in (".json", ".safetensors")
    ]


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether the module's parameters are DTensors (FSDP2) rather than plain tensors."""
    return any(isinstance(parameter, DTensor) for parameter in module.parameters())


def local_part(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The part of ``tensor`` that this rank holds and its offsets in the full tensor."""
    if isinstance(tensor, DTensor):
        _, offsets = compute_local_shape_and_global_offset(
            tensor.shape, tensor.device_mesh, tensor.placements
        )
        return tensor.to_local(), tuple(offsets)
    return tensor, (0,) * tensor.dim()


def stored_by(tensor: torch.Tensor, rank: int) -> bool:
    """Whether this rank's file holds its part of ``tensor``: each element is stored once, by
    the first replica of the shard that holds it."""
    if not isinstance(tensor, DTensor):
        return rank == 0
    if any(placement.is_partial() for placement in tensor.placements):
        raise ValueError("cannot store a DTensor with a Partial placement (reduce it first)")
    coordinate = tensor.device_mesh.get_coordinate() or []
    first_replica = all(
        index == 0
        for index, placement in zip(coordinate, tensor.placements, strict=True)
        if placement.is_replicate()
    )
    return first_replica and tensor.to_local().numel() > 0


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write_rank_file(
    directory: Path, kind: str, tensors: Mapping[str, torch.Tensor], rank: int, world_size: int
) -> list[str]:
    """This rank's ``<kind>`` files into ``directory``; returns their names."""
    parts: dict[str, torch.Tensor] = {}
    index: dict[str, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        entry: dict[str, Any] = {"shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype)}
        if stored_by(tensor, rank):
            local, offsets = local_part(tensor)
            parts[name] = local.detach().cpu().contiguous()
            entry.update(offsets=list(offsets), sizes=list(local.shape))
        index[name] = entry
    stem = rank_file_stem(kind, rank, world_size)
    save_file(parts, str(directory / f"{stem}.safetensors"))
    metadata = {"rank": rank, "world_size": world_size, "tensors": index}
    (directory / f"{stem}.json").write_text(json.dumps(metadata))
    return [f"{stem}.json", f"{stem}.safetensors"]


@dataclass(frozen=True)
class SavedPart:
    file: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class SavedTensor:
    shape: tuple[int, ...]
    dtype: torch.dtype
    parts: tuple[SavedPart, ...]


def overlap(
    part: SavedPart, offsets: tuple[int, ...], sizes: tuple[int, ...]
) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """Where ``part`` and the box at ``offsets`` of ``sizes`` overlap: the slices of that region
    in the part and in the box, or None when they do not overlap."""
    in_part, in_box = [], []
    for part_start, part_size, box_start, box_size in zip(
        part.offsets, part.sizes, offsets, sizes, strict=True
    ):
        start = max(part_start, box_start)
        stop = min(part_start + part_size, box_start + box_size)
        if start >= stop:
            return None
        in_part.append(slice(start - part_start, stop - part_start))
        in_box.append(slice(start - box_start, stop - box_start))
    return tuple(in_part), tuple(in_box)


class ShardReader:
    """The ``kind`` tensors that ``world_size`` ranks wrote, read into tensors of any layout.

    ``open_file`` gives the local path of a checkpoint file by its relative name (downloading and
    verifying it first, for a remote checkpoint); it is called only for the files a read needs.
    """

    def __init__(self, open_file: Callable[[str], Path], kind: str, world_size: int) -> None:
        self.kind = kind
        self._open_file = open_file
        self._handles: dict[str, Any] = {}
        self._stack = ExitStack()
        self.tensors = self._read_index(world_size)

    def _read_index(self, world_size: int) -> dict[str, SavedTensor]:
        shapes: dict[str, tuple[tuple[int, ...], str]] = {}
        parts: dict[str, list[SavedPart]] = {}
        for rank in range(world_size):
            stem = rank_file_stem(self.kind, rank, world_size)
            index = json.loads(self._open_file(f"{stem}.json").read_text())["tensors"]
            if rank > 0 and index.keys() != shapes.keys():
                raise CheckpointError(
                    f"{stem}.json lists other {self.kind} tensors than rank 0's: corrupt checkpoint"
                )
            for name, entry in index.items():
                shapes.setdefault(name, (tuple(entry["shape"]), entry["dtype"]))
                if "offsets" in entry:
                    part = SavedPart(
                        f"{stem}.safetensors", tuple(entry["offsets"]), tuple(entry["sizes"])
                    )
                    parts.setdefault(name, []).append(part)
        return {
            name: SavedTensor(shape, getattr(torch, dtype), tuple(parts.get(name, ())))
            for name, (shape, dtype) in shapes.items()
        }

    def fill(self, name: str, target: torch.Tensor) -> None:
        """Copy saved tensor ``name`` into ``target`` (a DTensor: its local shard) in place."""
        saved = self.tensors[name]
        if tuple(target.shape) != saved.shape:
            raise CheckpointError(
                f"{self.kind} tensor {name} has shape {list(saved.shape)} in the checkpoint but "
                f"{list(target.shape)} in the trainer"
            )
        local, offsets = local_part(target)
        copied = 0
        with torch.no_grad():
            for part in saved.parts:
                slices = overlap(part, offsets, tuple(local.shape))
                if slices is not None:
                    in_part, in_local = slices
                    local[in_local].copy_(self._handle(part.file).get_slice(name)[in_part])
                    copied += local[in_local].numel()
        if copied != local.numel():
            raise CheckpointError(
                f"the {self.kind} files hold {copied} of the {local.numel()} elements of "
                f"{name} this rank needs: corrupt checkpoint"
            )

    def full(self, name: str) -> torch.Tensor:
        """Saved tensor ``name`` whole, as a plain CPU tensor."""
        saved = self.tensors[name]
        tensor = torch.empty(saved.shape, dtype=saved.dtype)
        self.fill(name, tensor)
        return tensor

    def _handle(self, file: str) -> Any:
        if file not in self._handles:
            path = self._open_file(file)
            self._handles[file] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        return self._handles[file]

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
