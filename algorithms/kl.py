"""KL penalties between policy and reference, and the controllers of their coefficient beta.

A KL penalty maps ``(logprobs, ref_logprobs)`` to a per-token estimate of KL(policy || reference)
from the sampled tokens' logprobs, except ``"full"``, which takes the whole log-distributions
``[..., vocab]`` (see :func:`needs_full_distributions`). Ziegler et al. 2019, "Fine-Tuning
Language Models from Human Preferences"; the estimators of TRL v0.11.4's ``PPOTrainer``, and
``"k3"`` (J. Schulman, "Approximating KL Divergence", 2020), the one GRPO puts in its loss.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from rlfleet.algorithms.registry import Registry


class KLPenalty(Protocol):
    def __call__(self, logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor: ...


KL_PENALTIES: Registry[KLPenalty] = Registry("KL penalty")
register_kl_penalty = KL_PENALTIES.register


def needs_full_distributions(name: str) -> bool:
    """Whether the penalty ``name`` takes whole log-distributions instead of sampled logprobs."""
    return name == "full"


@register_kl_penalty("kl")
def log_ratio_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """``log pi(a) - log pi_ref(a)``: unbiased, can be negative."""
    return logprobs - ref_logprobs


@register_kl_penalty("abs")
def abs_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """``|log pi(a) - log pi_ref(a)|``."""
    return (logprobs - ref_logprobs).abs()


@register_kl_penalty("mse")
def mse_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """``0.5 * (log pi(a) - log pi_ref(a))^2``."""
    return 0.5 * (logprobs - ref_logprobs).square()


@register_kl_penalty("k3")
def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's low-variance estimator ``exp(log r) - log r - 1`` with
    ``log r = log pi_ref(a) - log pi(a)``: unbiased and never negative (TRL 1.16's GRPO KL;
    veRL's ``low_var_kl`` is the same, clamped to [-10, 10])."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1


@register_kl_penalty("full")
def full_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Exact ``sum_a pi(a) (log pi(a) - log pi_ref(a))`` from log-distributions ``[..., vocab]``."""
    return (logprobs.exp() * (logprobs - ref_logprobs)).sum(-1)


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019): ``beta *= 1 + clip(KL / target - 1,
    -0.2, 0.2) * n_steps / horizon``."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        self.value = float(init_kl_coef)
        self.target = target
        self.horizon = horizon

    def update(self, current: float, n_steps: int) -> None:
        proportional_error = float(np.clip(current / self.target - 1, -0.2, 0.2))
        self.value *= 1 + proportional_error * n_steps / self.horizon


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current: float, n_steps: int) -> None:
        """Nothing to adapt."""
