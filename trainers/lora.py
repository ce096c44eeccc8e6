"""LoRA training (peft): low-rank adapters on the policy, the base weights frozen.

``add_adapters`` injects peft's LoRA layers into a causal LM in place (``inject_adapter_in_model``:
no ``PeftModel`` wrapper, so the trainers' model stays a ``transformers`` model and a PPO value
head stays a trained full module beside it); only the adapters are left trainable.

The reference model is the same model with its adapters disabled (:class:`BaseModelForward`),
not a second copy: its logprobs are the base model's exactly. Generators and the ``policy/``
export get merged weights under the base model's parameter names (:func:`merged_state`:
``W + scale * B @ A`` computed per tensor, the trained model untouched), so any engine serves
them as a plain model; checkpoints hold the adapters (and the value head) and also export them in
peft's own format (:func:`save_adapter`, loadable by ``PeftModel.from_pretrained``).

A sharded learner (FSDP2: several ranks, or bfloat16) shards each block's frozen base weights
and its adapters together (FSDP2 reduces gradients only of the parameters that have one); the
optimizer holds the adapters (and the value head) only, and :func:`merged_state` gathers each
weight with its A and B to merge it. ``lora.dropout`` acts only where the model runs in training
mode: the trainers compute in eval mode (no dropout anywhere, as TRL), so there it has no effect.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.distributed.fsdp import FSDPModule

from rlfleet.common.config import JobConfig, LoraConfig
from rlfleet.trainers.distributed import gathered
from rlfleet.trainers.forward import PackedRows, ResponseForward, ResponseOutputs

ADAPTER = "default"
"""The name of the one adapter a LoRA job trains (peft's default)."""
ADAPTER_DIR = "adapter"
"""The checkpoint directory of the adapter in peft's format."""
PEFT_PREFIX = "base_model.model."
"""Where ``PeftModel.save_pretrained`` puts the wrapped model's names; ``from_pretrained`` reads
them so."""
INSTALL_HINT = "lora: needs peft, which is not installed; pip install rlfleet[lora]"


def check_lora_job(config: JobConfig) -> None:
    """Refuse, with one line, a ``lora`` job that cannot run: peft is not installed."""
    if config.lora is not None and importlib.util.find_spec("peft") is None:
        raise ValueError(INSTALL_HINT)


def peft_config(config: LoraConfig) -> Any:
    """peft's ``LoraConfig`` for the job's ``lora`` section."""
    try:
        from peft import LoraConfig as PeftLoraConfig
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return PeftLoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
    )


def add_adapters(model: nn.Module, config: LoraConfig) -> nn.Module:
    """``model`` (a causal LM) with LoRA adapters injected in place and only they trainable.

    The adapters start as a no-op (B is zero): the adapted model computes the base model."""
    from peft import inject_adapter_in_model

    with warnings.catch_warnings():  # GPT-2's Conv1D: peft sets fan_in_fan_out itself and says so
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
        return inject_adapter_in_model(peft_config(config), model, adapter_name=ADAPTER)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's LoRA layers by module name (none without peft installed)."""
    if importlib.util.find_spec("peft") is None:
        return {}
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def has_adapters(model: nn.Module) -> bool:
    """Whether the model carries LoRA adapters."""
    return bool(lora_layers(model))


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The base model inside the block: every LoRA layer bypassed (and its adapter weights
    without ``requires_grad``), as they were after it."""
    layers = list(lora_layers(model).values())
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class BaseModelForward(ResponseForward):
    """The reference of a LoRA policy: the policy's own forward with its adapters disabled.

    Given the policy's forward module (a sharded model's FSDP2 root, whose hooks gather the
    embeddings and LM head), it runs through it; given the model, through a forward of its own
    (enough for an unsharded model). Every rank disables the same layers, so the ranks' forwards
    stay in step."""

    def __init__(self, policy: nn.Module) -> None:
        if isinstance(policy, ResponseForward):
            forward = policy
        elif any(isinstance(module, FSDPModule) for module in policy.modules()):
            raise ValueError(
                "BaseModelForward: a sharded model's reference runs through the policy's FSDP2 "
                "root; pass the policy's ResponseForward, not its model"
            )
        else:
            forward = ResponseForward(policy)
        super().__init__(forward.model)
        self._policy = (forward,)  # a tuple: not a submodule, so no second copy of the names

    def forward(
        self,
        packed: PackedRows,
        with_values: bool = False,
        with_entropy: bool = False,
        with_full_logprobs: bool = False,
    ) -> ResponseOutputs:
        (policy,) = self._policy
        with adapters_disabled(self.model):
            return policy(packed, with_values, with_entropy, with_full_logprobs)


@torch.no_grad()
def merged_state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``model``'s state dict as the base model's (its parameter names), every adapted weight
    merged: ``W + scale * B @ A`` of the active adapter, as peft's ``merge_and_unload`` makes it.
    One merged tensor is made at a time; the model itself is not changed. Tensors are told
    apart by identity, not by name: a wrapper (``ResponseForward``, a value head's model) may
    name its state differently from its modules.

    Collective when the model is sharded (FSDP2): each weight, and an adapted one's A and B, is
    gathered whole (:func:`~rlfleet.trainers.distributed.gathered`), so every rank iterates it to
    the end, in the same order."""
    state = model.state_dict(keep_vars=True)
    layers = lora_layers(model).values()
    adapted = {id(layer.get_base_layer().weight): layer for layer in layers}
    adapters = {
        id(parameter)
        for layer in layers
        for part in layer.adapter_layer_names
        for parameter in getattr(layer, part).parameters()
    }
    for name, tensor in state.items():
        if id(tensor) in adapters:
            continue
        whole = gathered(tensor.detach())
        layer = adapted.get(id(tensor))
        if layer is not None:
            whole = merged_weight(layer, whole)
        yield name.replace(".base_layer.", "."), whole


def merged_weight(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (the layer's whole base weight) plus the deltas of its active adapters."""
    merged = weight.clone()
    for adapter in layer.active_adapters:
        merged += adapter_delta(layer, adapter).to(weight.dtype)
    return merged


def adapter_delta(layer: nn.Module, adapter: str) -> torch.Tensor:
    """peft's ``get_delta_weight`` of the layer's ``adapter``, whole: for a sharded layer
    computed on its A and B as DTensors (their ops run the collectives) and gathered."""
    return gathered(layer.get_delta_weight(adapter))


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights as peft saves them (``PEFT_PREFIX`` + the module's names, the
    adapter's name left out), whole: collective when the model is sharded."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    return {
        f"{PEFT_PREFIX}{name}": gathered(tensor.detach()).cpu().contiguous()
        for name, tensor in state.items()
    }


def save_adapter(
    model: nn.Module,
    directory: Path,
    base_model: str | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """The adapter in peft's format (``adapter_config.json``, ``adapter_model.safetensors``):
    ``PeftModel.from_pretrained(base, directory)`` gives the trained policy back. ``tensors``:
    the model's :func:`adapter_tensors`, gathered beforehand when the model is sharded (every
    rank takes part in that; only the writer calls this)."""
    config = model.peft_config[ADAPTER]
    config.base_model_name_or_path = base_model
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    save_file(
        adapter_tensors(model) if tensors is None else tensors,
        str(directory / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
