"""KL penalties and the KL coefficient's controllers on hand-worked numbers."""

from __future__ import annotations

import math

import pytest
import torch

from rlfleet.algorithms.kl import (
    KL_PENALTIES,
    AdaptiveKLController,
    FixedKLController,
    needs_full_distributions,
)


def test_every_kl_penalty_is_exactly_zero_when_policy_equals_reference():
    log_distributions = torch.log_softmax(torch.randn(3, 5, 11), dim=-1)
    tokens = torch.randint(0, 11, (3, 5, 1))
    sampled = log_distributions.gather(-1, tokens).squeeze(-1)
    for name in ("kl", "abs", "mse"):
        assert torch.equal(KL_PENALTIES[name](sampled, sampled.clone()), torch.zeros(3, 5))
    full = KL_PENALTIES["full"](log_distributions, log_distributions.clone())
    assert torch.equal(full, torch.zeros(3, 5))


def test_sampled_token_penalties_on_a_known_log_ratio():
    logprobs, ref_logprobs = torch.tensor([-1.0, -3.0]), torch.tensor([-1.5, -1.0])
    assert KL_PENALTIES["kl"](logprobs, ref_logprobs).tolist() == [0.5, -2.0]
    assert KL_PENALTIES["abs"](logprobs, ref_logprobs).tolist() == [0.5, 2.0]
    assert KL_PENALTIES["mse"](logprobs, ref_logprobs).tolist() == [0.125, 2.0]


def test_full_kl_is_the_exact_divergence_of_whole_distributions():
    p, q = torch.tensor([0.5, 0.25, 0.25]), torch.tensor([0.25, 0.25, 0.5])
    expected = 0.5 * math.log(2) + 0.25 * math.log(0.5)
    assert KL_PENALTIES["full"](p.log(), q.log()).item() == pytest.approx(expected, rel=1e-6)
    assert needs_full_distributions("full")
    assert not any(needs_full_distributions(name) for name in ("kl", "abs", "mse"))


def test_adaptive_kl_controller_moves_at_most_twenty_percent_per_horizon():
    controller = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    controller.update(6.0, n_steps=128)
    assert controller.value == 0.2
    controller.update(60.0, n_steps=128)
    assert controller.value == pytest.approx(0.2 * (1 + 0.2 * 128 / 10000), rel=1e-12)
    controller.update(0.0, n_steps=10000)
    assert controller.value == pytest.approx(0.2 * 1.00256 * 0.8, rel=1e-12)


def test_fixed_kl_controller_never_moves():
    controller = FixedKLController(0.3)
    controller.update(100.0, n_steps=128)
    assert controller.value == 0.3
