"""The frozen reference model the KL penalty measures the policy against.

A full fine-tune keeps a frozen copy of the policy (:func:`create_reference_model`). A LoRA policy
keeps none: its reference is the policy itself with the adapters disabled (trainers/lora.py), the
base weights being frozen anyway (:func:`frozen_reference`, :func:`reference_forward`).
"""

from __future__ import annotations

import copy

from torch import nn

from rlfleet.trainers.forward import ResponseForward
from rlfleet.trainers.lora import BaseModelForward, has_adapters
from rlfleet.trainers.value_head import AutoModelForCausalLMWithValueHead

LAYER_PATTERNS = (
    "transformer.h.{layer}",
    "model.decoder.layers.{layer}",
    "gpt_neox.layers.{layer}",
    "model.layers.{layer}",
)


def create_reference_model(
    model: AutoModelForCausalLMWithValueHead,
    num_shared_layers: int | None = None,
    pattern: str | None = None,
) -> AutoModelForCausalLMWithValueHead:
    """A frozen copy of ``model`` in eval mode.

    With ``num_shared_layers`` the policy's parameters before that layer are frozen too, so the
    first layers stay identical in both (TRL's semantics). ``pattern`` names the layers for an
    architecture the built-in ``LAYER_PATTERNS`` do not know, e.g. ``"transformer.h.{layer}"``.
    """
    reference = copy.deepcopy(model)
    for parameter in reference.parameters():
        parameter.requires_grad_(False)
    if num_shared_layers is not None:
        names = [name for name, _ in model.named_parameters()]
        patterns = (pattern,) if pattern is not None else LAYER_PATTERNS
        candidates = [p.format(layer=num_shared_layers) for p in patterns]
        first_shared = next((c for c in candidates if any(c in name for name in names)), None)
        if first_shared is None:
            raise ValueError(
                f"num_shared_layers={num_shared_layers}: no layer pattern matched (tried "
                f"{candidates}); pass pattern='<prefix>.{{layer}}' for this architecture"
            )
        for name, parameter in model.named_parameters():
            if first_shared in name:
                break
            parameter.requires_grad_(False)
    return reference.eval()


def frozen_reference(model: nn.Module, num_shared_layers: int | None = None) -> nn.Module | None:
    """The reference model a trainer keeps beside ``model``: a frozen copy, or None for a model
    with LoRA adapters, whose reference needs no weights of its own (:func:`reference_forward`)."""
    if not has_adapters(model):
        return create_reference_model(model, num_shared_layers)
    if num_shared_layers is not None:
        raise ValueError(
            "num_shared_layers: a LoRA model's reference already shares every base weight; "
            "leave num_shared_layers unset"
        )
    return None


def reference_forward(
    policy: ResponseForward, reference: ResponseForward | None
) -> ResponseForward | None:
    """The forward that reference logprobs come from: ``reference`` (a copy's), else for a LoRA
    policy the policy's own forward with its adapters disabled."""
    if reference is None and has_adapters(policy.model):
        return BaseModelForward(policy)
    return reference
