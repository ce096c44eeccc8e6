"""From one score per response to per-token rewards: optional running score scaling (TRL
v0.11.4's ``use_score_scaling``/``use_score_norm``/``score_clip``) and the KL-penalized reward
of Ziegler et al. 2019, ``r_t = -beta * KL_t``, plus the score on the response's last token."""

from __future__ import annotations

import torch


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


def scaled_scores(
    scores: torch.Tensor,
    running: RunningMoments,
    use_score_scaling: bool,
    use_score_norm: bool,
    score_clip: float | None,
) -> torch.Tensor:
    """With ``use_score_scaling``, fold ``scores`` into ``running`` and divide them by its std
    (after subtracting its mean with ``use_score_norm``); then clip to ``+-score_clip``."""
    if use_score_scaling:
        running.update(scores)
        moment = {"dtype": scores.dtype, "device": scores.device}
        factor = torch.tensor(running.std, **moment) + torch.finfo(scores.dtype).eps
        if use_score_norm:
            scores = (scores - torch.tensor(running.mean, **moment)) / factor
        else:
            scores = scores / factor
    if score_clip is not None:
        scores = torch.clip(scores, -score_clip, score_clip)
    return scores


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last masked-in position of each row."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, -1).amax(dim=1)


def per_token_rewards(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    token_rewards: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards ``r_t = -beta * KL_t`` plus the score on each response's last mask-1 token, plus
    ``token_rewards`` ``[batch, time]`` where given (a multi-turn environment's reward for each
    turn, on the turn's last sampled token), so ``rewards.sum(-1)`` is the whole return.

    Returns ``(rewards, non_score_rewards)``, both ``[batch, time]``.
    """
    non_score_rewards = -kl_coef * kl
    rewards = non_score_rewards.clone()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    if token_rewards is not None:
        rewards = rewards + token_rewards.to(rewards.dtype)
    return rewards, non_score_rewards
