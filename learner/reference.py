"""The frozen reference model the KL penalty measures the policy against."""

from __future__ import annotations

import copy

from rlfleet.learner.value_head import AutoModelForCausalLMWithValueHead

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
