"""The GRPO-family loss, its loss types and the k3 KL on hand-worked numbers."""

from __future__ import annotations

import math

import pytest
import torch

from rlfleet.algorithms.grpo import (
    LOSS_TYPES,
    CriticFreeLossConfig,
    critic_free_loss,
)
from rlfleet.algorithms.kl import KL_PENALTIES

# Two sequences of 2 and 1 tokens; advantages +1 and -1.
MASK = torch.tensor([[1, 1], [1, 0]])
ADVANTAGES = torch.tensor([1.0, -1.0])


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype))


def on_policy_loss(config: CriticFreeLossConfig, num_items_in_batch: float | None = None):
    logprobs = torch.full((2, 2), -1.0, requires_grad=True)
    output = critic_free_loss(
        logprobs, logprobs.detach(), None, ADVANTAGES, MASK, config, num_items_in_batch
    )
    output.loss.backward()
    return output.loss.detach(), logprobs.grad, output.metrics


def test_k3_is_the_low_variance_kl_estimate():
    logprobs, ref_logprobs = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0])
    # log r = ref - logp = -0.5: exp(-0.5) + 0.5 - 1; equal log-probabilities give exactly 0.
    close(KL_PENALTIES["k3"](logprobs, ref_logprobs), [math.exp(-0.5) - 0.5, 0.0])
    assert (KL_PENALTIES["k3"](torch.randn(100), torch.randn(100)) >= 0).all()


@pytest.mark.parametrize(
    ("loss_type", "expected_loss", "expected_grad"),
    [
        # Per-token losses -A: (-1, -1) and (1). grpo: mean of sequence means (-1 + 1) / 2.
        ("grpo", 0.0, [[-0.25, -0.25], [0.5, 0.0]]),
        # bnpo: mean over the 3 tokens.
        ("bnpo", -1 / 3, [[-1 / 3, -1 / 3], [1 / 3, 0.0]]),
        # dr_grpo: sum over batch size 2 x max_completion_length 4.
        ("dr_grpo", -1 / 8, [[-1 / 8, -1 / 8], [1 / 8, 0.0]]),
        # dapo: sum over num_items_in_batch 6.
        ("dapo", -1 / 6, [[-1 / 6, -1 / 6], [1 / 6, 0.0]]),
    ],
)
def test_loss_types_aggregate_as_trl(loss_type, expected_loss, expected_grad):
    config = CriticFreeLossConfig(loss_type=loss_type, max_completion_length=4)
    loss, gradient, metrics = on_policy_loss(config, num_items_in_batch=6)
    close(loss, expected_loss)
    # On-policy the ratio is 1 with derivative 1: d(-A rho)/dlogp = -A over the divisor.
    close(gradient, expected_grad)
    assert set(metrics) == {
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "clip_ratio/region_mean",
        "clip_ratio/low_min",
        "clip_ratio/high_max",
    }
    assert all(value.item() == 0.0 for value in metrics.values())


def test_dapo_without_num_items_counts_this_batch_and_scales_for_accumulation():
    loss, _, _ = on_policy_loss(CriticFreeLossConfig(loss_type="dapo"))
    close(loss, -1 / 3)
    config = CriticFreeLossConfig(
        loss_type="dapo", gradient_accumulation_steps=2, steps_per_generation=4
    )
    # The 12 tokens of the generation batch span 4 micro-steps, 2 of which make a window: 6.
    loss, _, _ = on_policy_loss(config, num_items_in_batch=12)
    close(loss, -1 / 6)
    loss, _, _ = on_policy_loss(
        CriticFreeLossConfig(loss_type="bnpo", gradient_accumulation_steps=2)
    )
    close(loss, -1 / 6)


def clipped(config: CriticFreeLossConfig, ratios: list[float], advantages: list[float]):
    """One token per sequence with the given ratios and advantages."""
    logprobs = torch.log(torch.tensor(ratios)).unsqueeze(1).requires_grad_(True)
    output = critic_free_loss(
        logprobs,
        torch.zeros(len(ratios), 1),
        None,
        torch.tensor(advantages),
        torch.ones(len(ratios), 1),
        config,
    )
    output.loss.backward()
    return output.loss.detach(), logprobs.grad.squeeze(1), output.metrics


def test_the_ratio_is_clipped_where_it_would_gain_and_clip_ratios_say_where():
    config = CriticFreeLossConfig(loss_type="bnpo", epsilon=0.2)
    # rho 2, A +1: -min(2, 1.2) = -1.2 (clipped high); rho 0.5, A -1: -min(-0.5, -0.8) = 0.8
    # (clipped low); rho 0.5, A +1: -0.5 (unclipped); rho 1.1, A -1: 1.1 (inside the range).
    loss, gradient, metrics = clipped(config, [2.0, 0.5, 0.5, 1.1], [1.0, -1.0, 1.0, -1.0])
    close(loss, (-1.2 + 0.8 - 0.5 + 1.1) / 4)
    close(gradient, [0.0, 0.0, -0.5 / 4, 1.1 / 4])
    close(metrics["clip_ratio/low_mean"], 0.25)
    close(metrics["clip_ratio/high_mean"], 0.25)
    close(metrics["clip_ratio/region_mean"], 0.5)
    close(metrics["clip_ratio/low_min"], 0.0)
    close(metrics["clip_ratio/high_max"], 1.0)


def test_epsilon_high_raises_only_the_upper_clip():
    loss, _, metrics = clipped(CriticFreeLossConfig(loss_type="bnpo"), [1.25], [1.0])
    close(loss, -1.2)
    assert metrics["clip_ratio/high_mean"].item() == 1.0
    high = CriticFreeLossConfig(loss_type="bnpo", epsilon_high=0.28)
    loss, _, metrics = clipped(high, [1.25, 0.75], [1.0, -1.0])
    close(loss, (-1.25 + 0.8) / 2)
    assert metrics["clip_ratio/high_mean"].item() == 0.0


def test_delta_caps_the_unclipped_ratio():
    # rho 3, A -1: -min(-3, -1.2) = 3 without delta; capped at delta 2.
    loss, _, _ = clipped(CriticFreeLossConfig(loss_type="bnpo"), [3.0], [-1.0])
    close(loss, 3.0)
    loss, _, _ = clipped(CriticFreeLossConfig(loss_type="bnpo", delta=2.0), [3.0], [-1.0])
    close(loss, 2.0)


def test_sequence_level_ratio_is_the_exp_of_the_mean_log_ratio():
    config = CriticFreeLossConfig(loss_type="grpo", importance_sampling_level="sequence")
    logprobs = torch.tensor([[math.log(1.21), 0.0, 5.0]], requires_grad=True)
    output = critic_free_loss(
        logprobs, torch.zeros(1, 3), None, torch.tensor([-1.0]), torch.tensor([[1, 1, 0]]), config
    )
    # Mean log ratio over the 2 tokens: log 1.1; rho 1.1 is inside [0.8, 1.2]: loss 1.1.
    close(output.loss, 1.1)
    output.loss.backward()
    # d(rho)/dlogp_t = rho / 2 on each real token.
    close(logprobs.grad, [[0.55, 0.55, 0.0]])


def test_beta_adds_the_k3_kl_times_the_ratio_and_logs_its_mean():
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref_logprobs = torch.tensor([[-1.5, -2.0]])
    config = CriticFreeLossConfig(loss_type="bnpo", beta=0.5)
    output = critic_free_loss(
        logprobs, logprobs.detach(), ref_logprobs, torch.tensor([0.0]), torch.ones(1, 2), config
    )
    k3 = math.exp(-0.5) - 0.5
    close(output.loss, 0.5 * k3 / 2)
    close(output.metrics["kl"], k3 / 2)
    output.loss.backward()
    # d(k3 * rho)/dlogp at rho = 1: dk3/dlogp + k3 = (1 - exp(-0.5)) + k3 on the first token.
    close(logprobs.grad, [[0.5 * ((1 - math.exp(-0.5)) + k3) / 2, 0.0]])
    unbiased = CriticFreeLossConfig(loss_type="bnpo", beta=0.5, use_bias_correction_kl=False)
    logprobs.grad = None
    output = critic_free_loss(
        logprobs, logprobs.detach(), ref_logprobs, torch.tensor([0.0]), torch.ones(1, 2), unbiased
    )
    output.loss.backward()
    close(logprobs.grad, [[0.5 * (1 - math.exp(-0.5)) / 2, 0.0]])


def test_importance_sampling_ratio_weights_the_policy_term_only():
    ratio = torch.tensor([[0.5, 0.5], [2.0, 2.0]])
    logprobs = torch.full((2, 2), -1.0)
    output = critic_free_loss(
        logprobs,
        logprobs,
        None,
        ADVANTAGES,
        MASK,
        CriticFreeLossConfig(loss_type="bnpo"),
        importance_sampling_ratio=ratio,
    )
    close(output.loss, (-0.5 - 0.5 + 2.0) / 3)


def test_configuration_errors_are_named():
    with pytest.raises(ValueError, match="dr_grpo needs max_completion_length"):
        on_policy_loss(CriticFreeLossConfig(loss_type="dr_grpo"))
    with pytest.raises(ValueError, match="needs the reference log-probabilities"):
        on_policy_loss(CriticFreeLossConfig(beta=0.1))
    with pytest.raises(ValueError, match="importance_sampling_level must be token or sequence"):
        on_policy_loss(CriticFreeLossConfig(importance_sampling_level="batch"))
    with pytest.raises(KeyError, match="unknown loss type 'ppo'; known: bnpo, dapo, dr_grpo, grpo"):
        on_policy_loss(CriticFreeLossConfig(loss_type="ppo"))
    assert sorted(LOSS_TYPES) == ["bnpo", "dapo", "dr_grpo", "grpo"]
