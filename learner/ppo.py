"""The PPO math of KL-penalized RLHF, in one place, with the paper's names.

Everything here works on ``[batch, time]`` tensors of response tokens plus a ``mask`` that is 1
on real tokens (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences";
Schulman et al. 2017, "Proximal Policy Optimization Algorithms"). The formulas are those of TRL
v0.11.4's ``PPOTrainer`` with two departures where v0.11.4 was wrong: a variance of fewer than
two values is the (zero) biased variance instead of ``x / 0`` (NaN), and whitened rewards are
zero on padding (v0.11.4's depended on how much padding followed each response).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

KLEstimator = Literal["kl", "abs", "mse", "full"]

WHITEN_EPS = 1e-8


def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1 (over all elements, or along ``axis``)."""
    if axis is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(axis=axis) / mask.sum(axis=axis)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` where ``mask`` is 1; Bessel-corrected when ``unbiased``.

    With a single masked value the unbiased variance is undefined; the biased one (0) is returned.
    """
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    count = mask.sum()
    if count == 0:
        raise ValueError("masked_var: the mask selects no values")
    if unbiased and count > 1:
        variance = variance * (count / (count - 1))
    return variance


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True
) -> torch.Tensor:
    """Scale to unit (masked) variance; centre on zero unless ``shift_mean`` is False."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


def std(values: torch.Tensor) -> torch.Tensor:
    """Unbiased standard deviation, 0 for a single value (torch gives NaN)."""
    if values.numel() < 2:
        return torch.zeros((), dtype=values.dtype)
    return values.std()


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator
) -> torch.Tensor:
    """Per-token KL estimate between policy and reference from the sampled tokens' logprobs.

    ``"full"`` needs whole distributions: use :func:`full_kl` on the log-softmaxed logits.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "kl":
        return log_ratio
    if estimator == "abs":
        return log_ratio.abs()
    if estimator == "mse":
        return 0.5 * log_ratio.square()
    raise ValueError(f"kl_penalty {estimator!r} is not a per-token estimator; use full_kl")


def full_kl(logprobs_all: torch.Tensor, ref_logprobs_all: torch.Tensor) -> torch.Tensor:
    """Exact KL(policy || reference) per position from full log-distributions ``[..., vocab]``."""
    return (logprobs_all.exp() * (logprobs_all - ref_logprobs_all)).sum(-1)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last masked-in position of each row."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, -1).amax(dim=1)


def per_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards ``r_t = -beta * KL_t`` plus the score on each response's last token.

    Returns ``(rewards, non_score_rewards)``, both ``[batch, time]``.
    """
    non_score_rewards = -kl_coef * kl
    rewards = non_score_rewards.clone()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards, non_score_rewards


def generalized_advantages(
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    whiten_rewards: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GAE (Schulman et al. 2016): ``delta_t = r_t + gamma V_{t+1} - V_t``,
    ``A_t = delta_t + gamma lam A_{t+1}``, returns ``R_t = A_t + V_t`` from the raw advantages.

    Returns ``(masked values, whitened advantages, returns)``.
    """
    values = values * mask
    rewards = rewards * mask
    if whiten_rewards:
        # Re-masked: v0.11.4 left (0 - mean) * scale + mean on padding after each response,
        # which GAE then carried into the response, an amount that depended on the padding.
        rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
    steps = rewards.shape[-1]
    last_advantage: torch.Tensor | float = 0.0
    advantages_reversed = []
    for t in reversed(range(steps)):
        next_values = values[:, t + 1] if t < steps - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_advantage = delta + gamma * lam * last_advantage
        advantages_reversed.append(last_advantage)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values
    return values, masked_whiten(advantages, mask).detach(), returns


def clipped_value_loss(
    vpreds: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``0.5 * mean(max((V - R)^2, (clip(V, V_old +- eps) - R)^2))`` and its clip fraction."""
    vpred_clipped = torch.clamp(vpreds, old_values - cliprange_value, old_values + cliprange_value)
    losses_unclipped = (vpreds - returns) ** 2
    losses_clipped = (vpred_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(losses_unclipped, losses_clipped), mask)
    clipfrac = masked_mean(torch.gt(losses_clipped, losses_unclipped).float(), mask)
    return loss, clipfrac


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO-clip: ``mean(max(-A * rho, -A * clip(rho, 1 +- eps)))`` with ``rho = pi / pi_old``.

    Returns ``(loss, clip fraction, ratio)``.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    losses_unclipped = -advantages * ratio
    losses_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(losses_unclipped, losses_clipped), mask)
    clipfrac = masked_mean(torch.gt(losses_clipped, losses_unclipped).float(), mask)
    return loss, clipfrac, ratio


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


class RunningMoments:
    """Running mean and standard deviation of a stream of scores (parallel-variance update).

    Computed in float32 as TRL does; ``count`` starts at 1e-24 so the first batch sets the moments.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.std = 1.0
        self.var = 1.0
        self.count = 1e-24

    @torch.no_grad()
    def update(self, xs: torch.Tensor) -> tuple[float, float]:
        """Fold in a batch; returns the batch's mean and unbiased std (0 for a single value)."""
        xs_count = xs.numel()
        xs_var, xs_mean = torch.var_mean(xs.float(), unbiased=False)
        delta = xs_mean - self.mean
        total_count = self.count + xs_count
        new_sum = xs_var * xs_count
        old_sum = self.var * self.count + delta**2 * self.count * xs_count / total_count
        new_var = (old_sum + new_sum) / total_count
        self.mean += (delta * xs_count / total_count).item()
        if total_count > 1:
            self.std = (new_var * total_count / (total_count - 1)).sqrt().item()
        self.var = new_var.item()
        self.count = total_count
        batch_std = (xs_var * xs_count / (xs_count - 1)).sqrt().item() if xs_count > 1 else 0.0
        return xs_mean.item(), batch_std

    def state(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std, "var": self.var, "count": self.count}

    def load_state(self, state: dict[str, float]) -> None:
        self.mean, self.std = float(state["mean"]), float(state["std"])
        self.var, self.count = float(state["var"]), float(state["count"])
