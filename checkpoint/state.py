"""A trainer's model and optimizer state by name, stored without pickle, restored into a model of
any layout (plain, or FSDP2-sharded over any number of ranks).

Tensors go through safetensors, everything else through JSON (:func:`encode_state`). The
optimizer's state is keyed by parameter name instead of position, so that a checkpoint fits any
trainer whose model has the same parameters, however they are sharded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlfleet.checkpoint.shards import CheckpointError, ShardReader
from rlfleet.trainers.lora import has_adapters

_TAGS = ("__tensor__", "__ndarray__", "__tuple__", "__items__")


def encode_state(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (dicts, lists, tuples, tensors, numbers) into JSON and tensors.

    Tuples, dicts with non-string keys (an optimizer's ``state`` is keyed by parameter index) and
    numpy arrays are tagged so that :func:`decode_state` gives back the same structure. Tensors
    are kept as they are (DTensors stay DTensors); the writer makes them contiguous CPU tensors.
    """
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach()
            return {"__tensor__": path}
        if isinstance(value, np.ndarray):
            tensors[path] = torch.from_numpy(np.ascontiguousarray(value))
            return {"__ndarray__": path}
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, dict):
            if all(isinstance(key, str) and key not in _TAGS for key in value):
                return {key: encode(item, f"{path}.{key}") for key, item in value.items()}
            return {
                "__items__": [
                    [encode(key, f"{path}.key{i}"), encode(item, f"{path}.{key}")]
                    for i, (key, item) in enumerate(value.items())
                ]
            }
        if isinstance(value, tuple):
            return {"__tuple__": [encode(item, f"{path}.{i}") for i, item in enumerate(value)]}
        if isinstance(value, list):
            return [encode(item, f"{path}.{i}") for i, item in enumerate(value)]
        if value is None or isinstance(value, bool | int | float | str):
            return value
        raise TypeError(
            f"{path}: cannot store a {type(value).__name__} in a checkpoint (tensors, arrays, "
            "numbers, strings, lists, tuples and dicts only)"
        )

    return encode(state, "state"), tensors


def decode_state(encoded: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`encode_state`."""
    if isinstance(encoded, list):
        return [decode_state(item, tensors) for item in encoded]
    if not isinstance(encoded, dict):
        return encoded
    if set(encoded) == {"__tensor__"}:
        return tensors[encoded["__tensor__"]]
    if set(encoded) == {"__ndarray__"}:
        return tensors[encoded["__ndarray__"]].numpy()
    if set(encoded) == {"__tuple__"}:
        return tuple(decode_state(item, tensors) for item in encoded["__tuple__"])
    if set(encoded) == {"__items__"}:
        return {
            decode_state(key, tensors): decode_state(item, tensors)
            for key, item in encoded["__items__"]
        }
    return {key: decode_state(item, tensors) for key, item in encoded.items()}


def save_state(directory: Path, name: str, state: Any) -> list[str]:
    """``<name>.json`` and, when the state holds tensors, ``<name>.safetensors``; returns the
    names of the files written."""
    encoded, tensors = encode_state(state)
    written = [f"{name}.json"]
    if tensors:
        contiguous = {key: value.cpu().contiguous() for key, value in tensors.items()}
        save_file(contiguous, str(directory / f"{name}.safetensors"))
        written.append(f"{name}.safetensors")
    (directory / f"{name}.json").write_text(json.dumps(encoded))
    return written


def load_state(directory: Path, name: str) -> Any:
    tensor_file = directory / f"{name}.safetensors"
    tensors = load_file(str(tensor_file)) if tensor_file.exists() else {}
    return decode_state(json.loads((directory / f"{name}.json").read_text()), tensors)


# ----------------------------------------------------------------------------------------------
# The model's tensors and the optimizer's state by name


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors a checkpoint holds: its state dict with each tensor once (a tied
    weight, GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``, only under the name it has
    first). A model with LoRA adapters: only its trained tensors (the adapters, a value head);
    its frozen base weights are the model directory's."""
    tensors = _distinct_tensors(model)
    if has_adapters(model):
        return {name: tensor for name, tensor in tensors.items() if tensor.requires_grad}
    return tensors


def _distinct_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    seen: set[int] = set()
    tensors = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            tensors[name] = tensor
    return tensors


def tied_names(model: torch.nn.Module) -> set[str]:
    """State dict names that repeat a tensor of an earlier name (tied weights)."""
    return set(model.state_dict(keep_vars=True)) - set(_distinct_tensors(model))


def optimizer_groups(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The names of the parameters of each of the optimizer's param groups."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    groups = optimizer.param_groups
    unnamed = [i for i, group in enumerate(groups) for p in group["params"] if id(p) not in names]
    if unnamed:
        raise CheckpointError(
            f"param groups {sorted(set(unnamed))} of the optimizer hold tensors that are not "
            "parameters of the trainer's model; a checkpoint names optimizer state by parameter"
        )
    return [[names[id(parameter)] for parameter in group["params"]] for group in groups]


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` keyed by parameter name instead of position (its tensors are
    the optimizer's own, DTensors for a sharded model: no copy)."""
    names = [name for group in optimizer_groups(model, optimizer) for name in group]
    state = optimizer.state_dict()
    return {
        "state": {names[index]: slots for index, slots in state["state"].items()},
        "param_groups": [
            {**group, "params": [names[index] for index in group["params"]]}
            for group in state["param_groups"]
        ],
    }


def load_model_tensors(model: torch.nn.Module, reader: ShardReader) -> None:
    """Copy the saved model tensors into ``model`` in place (into each rank's own shards)."""
    targets = model_tensors(model)
    _check_same_names("model", set(reader.tensors), set(targets))
    for name, target in targets.items():
        reader.fill(name, target)


def load_optimizer_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    encoded: Any,
    reader: ShardReader,
) -> None:
    """Restore the optimizer from the JSON structure of :func:`optimizer_state` and its saved
    tensors. A state tensor with its parameter's shape (Adam's moments) takes the parameter's
    layout (its shards); any other (a step count) is read whole."""
    groups = optimizer_groups(model, optimizer)
    saved_groups = [group["params"] for group in encoded["param_groups"]]
    if saved_groups != groups:
        raise CheckpointError(
            "the checkpoint's optimizer param groups hold other parameters than the trainer's "
            f"({_summary(saved_groups)} vs {_summary(groups)})"
        )
    parameters = {
        name: parameter
        for names, group in zip(groups, optimizer.param_groups, strict=True)
        for name, parameter in zip(names, group["params"], strict=True)
    }
    state = decode_state(encoded, _state_tensors(encoded, parameters, reader))
    position = {name: index for index, name in enumerate(parameters)}
    optimizer.load_state_dict(
        {
            "state": {position[name]: slots for name, slots in state["state"].items()},
            "param_groups": [
                {**group, "params": [position[name] for name in group["params"]]}
                for group in state["param_groups"]
            ],
        }
    )


def _state_tensors(
    encoded: Any, parameters: dict[str, torch.Tensor], reader: ShardReader
) -> dict[str, torch.Tensor]:
    """Every tensor the encoded optimizer state refers to, read from ``reader`` into the layout
    it takes in this trainer."""
    owners = {
        slot["__tensor__"]: name
        for name, slots in encoded["state"].items()
        for slot in slots.values()
        if isinstance(slot, dict) and set(slot) == {"__tensor__"}
    }
    _check_same_names("optimizer", set(reader.tensors), _tensor_refs(encoded))
    tensors = {}
    for key, saved in reader.tensors.items():
        parameter = parameters.get(owners.get(key, ""))
        if parameter is not None and saved.shape == tuple(parameter.shape):
            tensors[key] = torch.empty_like(parameter, dtype=saved.dtype)
            reader.fill(key, tensors[key])
        else:
            tensors[key] = reader.full(key)
    return tensors


def _tensor_refs(encoded: Any) -> set[str]:
    if isinstance(encoded, list):
        return set().union(*map(_tensor_refs, encoded)) if encoded else set()
    if not isinstance(encoded, dict):
        return set()
    if set(encoded) in ({"__tensor__"}, {"__ndarray__"}):
        return {next(iter(encoded.values()))}
    return _tensor_refs(list(encoded.values()))


def _summary(groups: list[list[str]]) -> str:
    return "; ".join(f"{len(group)} starting {group[:1]}" for group in groups)


def _check_same_names(kind: str, saved: set[str], expected: set[str]) -> None:
    if saved != expected:
        missing, unexpected = sorted(expected - saved), sorted(saved - expected)
        raise CheckpointError(
            f"the checkpoint's {kind} tensors do not fit the trainer: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} ({len(missing)} and {len(unexpected)} in all)"
        )
