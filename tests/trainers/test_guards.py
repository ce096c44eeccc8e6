"""Non-finite training stops the step with a clear error (or skips it under
``ppo.nonfinite: skip``); that such weights are never published or checkpointed is the learner's
(tests/learner/test_actor.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from support.batches import ppo_step_batch
from transformers import AutoTokenizer

from rlfleet.common.config import PPOConfig
from rlfleet.trainers.guards import (
    NonFiniteError,
    check_finite_loss,
    check_finite_weights,
    finite_grad_norm,
    grad_norm,
)
from rlfleet.trainers.ppo import PPOTrainer
from rlfleet.trainers.value_head import AutoModelForCausalLMWithValueHead


def test_check_finite_loss_names_where_and_what_to_do() -> None:
    check_finite_loss(torch.tensor(1.5), "here")
    with pytest.raises(NonFiniteError, match=r"^PPO step 2, epoch 0, minibatch 1: the loss is nan"):
        check_finite_loss(torch.tensor(math.nan), "PPO step 2, epoch 0, minibatch 1")
    with pytest.raises(NonFiniteError, match="ppo.nonfinite: skip"):
        check_finite_loss(torch.tensor(math.inf), "x")


def test_grad_norm_is_checked_over_every_gradient() -> None:
    layer = torch.nn.Linear(2, 1)
    assert grad_norm(layer.parameters()) == 0.0
    layer.weight.grad = torch.tensor([[3.0, 4.0]])
    assert finite_grad_norm(layer.parameters(), "x") == pytest.approx(5.0)
    layer.bias.grad = torch.tensor([math.inf])
    with pytest.raises(NonFiniteError, match=r"^step 1: the gradient norm is inf"):
        finite_grad_norm(layer.parameters(), "step 1")


def test_check_finite_weights_names_the_parameter() -> None:
    layer = torch.nn.Linear(2, 1)
    check_finite_weights(layer, "x")
    with torch.no_grad():
        layer.bias.fill_(math.nan)
    with pytest.raises(NonFiniteError, match=r"^PPO step 3: weight bias is not finite"):
        check_finite_weights(layer, "PPO step 3")


# ----------------------------------------------------------------------------------------------
# The trainer


def make_trainer(model_dir: Path, **ppo) -> PPOTrainer:
    config = PPOConfig(batch_size=8, mini_batch_size=4, ppo_epochs=1, **ppo)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
    return PPOTrainer(config, model, tokenizer=AutoTokenizer.from_pretrained(model_dir))


def batch(seed: int):
    return ppo_step_batch(seed, 8, rng="numpy", vocab=400, query_lengths=4, response_lengths=6)


def weights(trainer: PPOTrainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_a_huge_learning_rate_fails_with_an_error_naming_step_and_minibatch(tiny_model_dir):
    """ppo.learning_rate=1000 used to train on NaN and exit 0."""
    trainer = make_trainer(tiny_model_dir, learning_rate=1000.0)
    with pytest.raises(NonFiniteError, match=r"^PPO step \d+, epoch 0, minibatch \d: the "):
        for seed in range(4):
            trainer.step(*batch(seed))


def test_a_nan_loss_stops_the_step_before_any_update(tiny_model_dir):
    trainer = make_trainer(tiny_model_dir)
    with torch.no_grad():
        trainer.model.v_head.summary.bias.fill_(math.nan)
    before = weights(trainer)
    with pytest.raises(NonFiniteError, match=r"^PPO step 1, epoch 0, minibatch 0: the loss is nan"):
        trainer.step(*batch(0))
    torch.testing.assert_close(weights(trainer), before, rtol=0, atol=0, equal_nan=True)


def nan_gradients(trainer: PPOTrainer) -> None:
    """A finite loss whose backward pass leaves a NaN gradient on the LM head."""
    trainer.model.pretrained_model.lm_head.weight.register_hook(lambda grad: grad * math.nan)


def test_a_nan_gradient_stops_the_step_before_the_optimizer_steps(tiny_model_dir):
    trainer = make_trainer(tiny_model_dir)
    nan_gradients(trainer)
    before = weights(trainer)
    with pytest.raises(NonFiniteError, match=r"minibatch 0: the gradient norm is nan"):
        trainer.step(*batch(0))
    assert all(torch.equal(before[k], v) for k, v in weights(trainer).items())


def test_nonfinite_skip_skips_and_counts_the_optimizer_steps(tiny_model_dir):
    trainer = make_trainer(tiny_model_dir, nonfinite="skip")
    nan_gradients(trainer)
    before = weights(trainer)
    trainer.step(*batch(0))
    trainer.step(*batch(1))
    assert trainer.nonfinite_skipped_steps == 4  # 2 steps x 2 minibatches
    assert all(torch.equal(before[k], v) for k, v in weights(trainer).items())


def test_a_huge_learning_rate_under_skip_keeps_training_on_finite_weights(tiny_model_dir):
    trainer = make_trainer(tiny_model_dir, learning_rate=1000.0, nonfinite="skip")
    for seed in range(3):
        trainer.step(*batch(seed))
    assert trainer.nonfinite_skipped_steps > 0
    check_finite_weights(trainer.model, "after")
