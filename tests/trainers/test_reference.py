"""The reference model: a frozen copy, optionally sharing the policy's first layers."""

from __future__ import annotations

import pytest
import torch

from rlfleet.trainers.reference import create_reference_model
from rlfleet.trainers.value_head import AutoModelForCausalLMWithValueHead


@pytest.fixture()
def model(tiny_model_dir):
    return AutoModelForCausalLMWithValueHead.from_pretrained(tiny_model_dir)


def test_reference_is_a_frozen_copy_in_eval_mode(model):
    reference = create_reference_model(model)
    assert reference is not model and not reference.training
    assert not any(p.requires_grad for p in reference.parameters())
    assert all(p.requires_grad for p in model.parameters())
    for name, tensor in model.state_dict().items():
        assert torch.equal(reference.state_dict()[name], tensor), name


def test_shared_layers_freeze_the_policy_before_that_layer(model):
    create_reference_model(model, num_shared_layers=1)
    prefix = "pretrained_model.transformer."
    frozen = {
        name.removeprefix(prefix) for name, p in model.named_parameters() if not p.requires_grad
    }
    assert "wte.weight" in frozen and "wpe.weight" in frozen
    assert any(name.startswith("h.0.") for name in frozen)
    assert not any(name.startswith(("h.1.", "ln_f.")) for name in frozen)
    assert model.v_head.summary.weight.requires_grad
    with pytest.raises(ValueError, match="num_shared_layers=99: no layer pattern matched"):
        create_reference_model(model, num_shared_layers=99)


def test_a_custom_layer_pattern_shares_the_layers_before_it(model) -> None:
    create_reference_model(model, num_shared_layers=1, pattern="transformer.h.{layer}.")
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    layers = "pretrained_model.transformer.h."
    assert not any(name.startswith(f"{layers}1") for name in frozen)
    assert any(name.startswith(f"{layers}0") for name in frozen)
    assert model.current_device == torch.device("cpu")
