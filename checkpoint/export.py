"""A checkpoint's exports: the policy as a Hugging Face directory and the value head's weights;
for a LoRA policy the merged model in ``policy/`` and the adapter in peft's format (``adapter/``).

They are for people and tools (``AutoModelForCausalLM.from_pretrained``, serving); a resume
reads the exact state from the per-rank files instead (checkpoint/shards.py). A plain
model saves itself (``save_pretrained``); a sharded one is gathered one tensor at a time
(``full_state``, a collective every rank runs) and written by rank 0 in safetensors files of at
most ``max_file_bytes`` each (plus their index), so no rank ever holds the whole model gathered.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from rlfleet.checkpoint.shards import is_sharded
from rlfleet.checkpoint.state import tied_names
from rlfleet.trainers.distributed import full_state
from rlfleet.trainers.lora import (
    ADAPTER_DIR,
    adapter_tensors,
    has_adapters,
    merged_state,
    save_adapter,
)
from rlfleet.trainers.value_head import V_HEAD_PREFIX

POLICY_DIR = "policy"
VALUE_HEAD_FILE = "value_head.safetensors"
MAX_FILE_BYTES = 2 << 30
"""The largest safetensors file of a gathered policy export (Hugging Face's default is 5 GB)."""
SAFETENSORS_METADATA = {"format": "pt"}


def has_value_head(trainer: Any) -> bool:
    """Whether the trainer's model carries a value head (PPO) or is a plain causal LM (a
    critic-free trainer's)."""
    return hasattr(trainer.model, "v_head")


def policy_of(trainer: Any) -> torch.nn.Module:
    """The trainer's causal LM, without any value head."""
    return trainer.model.pretrained_model if has_value_head(trainer) else trainer.model


def write_exports(
    directory: Path | None, trainer: Any, max_file_bytes: int = MAX_FILE_BYTES
) -> list[str]:
    """``policy/`` (and ``value_head.safetensors`` for PPO) into ``directory``; returns the
    files written, relative to it. Every rank calls it for a sharded model (the gather is
    collective) with ``directory`` None on all but rank 0, which writes."""
    if is_sharded(trainer.model):
        return _write_gathered(directory, trainer, max_file_bytes)
    if directory is None:
        return []
    policy_dir = directory / POLICY_DIR
    _save_policy(policy_of(trainer), policy_dir)
    _save_tokenizer(trainer, policy_dir)
    if has_value_head(trainer):
        state = trainer.model.v_head.state_dict()
        value_head = {k: v.detach().contiguous() for k, v in state.items()}
        save_file(value_head, str(directory / VALUE_HEAD_FILE))
    return _exported_files(directory)


def _save_policy(model: torch.nn.Module, directory: Path) -> None:
    """``model`` as a Hugging Face directory; a LoRA model merged (loadable without peft), its
    adapter beside it in peft's format."""
    if not has_adapters(model):
        model.save_pretrained(directory)
        return
    model.save_pretrained(directory, state_dict=dict(merged_state(model)))
    save_adapter(model, directory.parent / ADAPTER_DIR, model.config.name_or_path or None)


def _write_gathered(directory: Path | None, trainer: Any, max_file_bytes: int) -> list[str]:
    """The sharded model gathered one tensor at a time by every rank, written by rank 0 (given
    ``directory``): a LoRA policy merged, and its adapter gathered for ``adapter/``."""
    skip = tied_names(trainer.model)
    lora = has_adapters(trainer.model)
    state = merged_state(trainer.model) if lora else full_state(trainer.model)
    gathered = ((n, t) for n, t in state if n not in skip)
    adapter = adapter_tensors(policy_of(trainer)) if lora else None
    if directory is None:
        for _ in gathered:  # the gather is collective: take part, keep nothing
            pass
        return []
    policy = _FileSplitter(directory / POLICY_DIR, max_file_bytes)
    value_head: dict[str, torch.Tensor] = {}
    for name, tensor in gathered:
        full = tensor.detach().cpu().contiguous()
        if has_value_head(trainer) and name.startswith(V_HEAD_PREFIX):
            value_head[name.removeprefix(V_HEAD_PREFIX)] = full
        else:
            policy.add(name, full)
    policy.close()
    model = policy_of(trainer)
    model.config.save_pretrained(policy.directory)
    if model.can_generate():
        model.generation_config.save_pretrained(policy.directory)
    _save_tokenizer(trainer, policy.directory)
    if value_head:
        save_file(value_head, str(directory / VALUE_HEAD_FILE), metadata=SAFETENSORS_METADATA)
    if adapter is not None:
        save_adapter(model, directory / ADAPTER_DIR, model.config.name_or_path or None, adapter)
    return _exported_files(directory)


def _save_tokenizer(trainer: Any, directory: Path) -> None:
    """The tokenizer beside the weights, when the trainer has one (TRL's may have none)."""
    if getattr(trainer, "tokenizer", None) is not None:
        trainer.tokenizer.save_pretrained(directory)


def _exported_files(directory: Path) -> list[str]:
    policy_files = [
        path
        for folder in (POLICY_DIR, ADAPTER_DIR)
        for path in (directory / folder).rglob("*")
        if path.is_file()
    ]
    value_head = [directory / VALUE_HEAD_FILE] if (directory / VALUE_HEAD_FILE).is_file() else []
    return sorted(path.relative_to(directory).as_posix() for path in policy_files + value_head)


class _FileSplitter:
    """Tensors into ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` with
    ``model.safetensors.index.json`` once they exceed ``max_file_bytes``: Hugging Face's layout."""

    def __init__(self, directory: Path, max_file_bytes: int) -> None:
        self.directory = directory
        self.max_file_bytes = max_file_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._files: list[list[str]] = []
        self._total_bytes = 0
        directory.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_file_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += size
        self._total_bytes += size

    def _flush(self) -> None:
        save_file(self._pending, str(self._part(len(self._files))), metadata=SAFETENSORS_METADATA)
        self._files.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def _part(self, index: int) -> Path:
        return self.directory / f".part-{index:05d}.safetensors"

    def close(self) -> None:
        """Name the files as Hugging Face does, now that their count is known."""
        if self._pending or not self._files:
            self._flush()
        count = len(self._files)
        if count == 1:
            os.replace(self._part(0), self.directory / "model.safetensors")
            return
        weight_map = {}
        for index, names in enumerate(self._files):
            final = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self._part(index), self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        index_file = self.directory / "model.safetensors.index.json"
        index = {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}
        index_file.write_text(json.dumps(index, indent=2))
