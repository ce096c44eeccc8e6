"""Off-policy corrections between the generator's policy (the behaviour, ``rollout_logprobs``) and
the learner's old policy (``old_logprobs``), and the metrics of their mismatch.

The generator samples with other numerics (vLLM, bfloat16) and, with ``one_step_off`` or an
asynchronous fleet, older weights than the learner's: its samples are off-policy for the learner.
A correction is ``(old_logprobs, rollout_logprobs, mask, **params) -> CorrectionOutput``, every
tensor ``[batch, width]``, ``mask`` 1 on the tokens the policy sampled:

- ``weights`` multiply each token's policy loss after the PPO clip (None: all ones);
- ``keep_mask`` multiplies into the loss mask: a 0 takes the token out of the loss *and* its
  denominators (None: every token stays);
- ``metrics`` describe what the correction did (names as veRL 0.9.1 logs them, less its
  ``rollout_is_``/``rollout_rs_`` prefixes).

The modes are veRL 0.9.1's (``verl/trainer/ppo/rollout_corr_helper.py``), with its arithmetic: log
ratios ``log pi_old - log pi_rollout`` clamped to ``+-20`` before ``exp``, a sequence's ratio the
product of its tokens' ratios (or their geometric mean). Ionides 2008 (truncated IS), Liu et al.
2025 "When Speed Kills Stability" (sequence-level IS and masked IS), Ling team 2025 (IcePop).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch

from rlfleet.algorithms.losses import truncated_importance_weights
from rlfleet.algorithms.masked import masked_mean
from rlfleet.algorithms.registry import Registry

SAFETY_BOUND = 20.0
"""veRL's bound on a log ratio before ``exp`` (``exp(20)`` is about 5e8): no overflow."""


class CorrectionOutput(NamedTuple):
    weights: torch.Tensor | None
    """Per-token multipliers of the policy loss; None: all ones."""
    keep_mask: torch.Tensor | None
    """1: the token stays in the loss, 0: out of the loss and its denominators; None: all 1."""
    metrics: dict[str, torch.Tensor]
    """Single-value tensors by name (no prefix)."""


class RolloutCorrection(Protocol):
    def __call__(
        self,
        old_logprobs: torch.Tensor,
        rollout_logprobs: torch.Tensor,
        mask: torch.Tensor,
        **params: Any,
    ) -> CorrectionOutput: ...


ROLLOUT_CORRECTIONS: Registry[RolloutCorrection] = Registry("rollout correction")
register_correction = ROLLOUT_CORRECTIONS.register
DROPS_TOKENS = frozenset({"seq_mis"})
"""The corrections whose ``keep_mask`` may take tokens out: a trainer needs it before the first
minibatch, since it changes the loss's denominators (and the advantages' statistics)."""


def safe_log_ratio(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor) -> torch.Tensor:
    """``log pi_old / pi_rollout`` per token within ``+-SAFETY_BOUND``."""
    return torch.clamp(old_logprobs - rollout_logprobs, -SAFETY_BOUND, SAFETY_BOUND)


def row_sums(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row's sum over its mask-1 tokens, ``[batch]`` (a NaN elsewhere reads as 0)."""
    return torch.where(mask.bool(), values, 0.0).sum(-1)


def row_means(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row's mean over its mask-1 tokens, 0 for a row without any (as veRL's)."""
    return row_sums(values, mask) / mask.sum(-1).clamp(min=1)


def zero_like(mask: torch.Tensor) -> torch.Tensor:
    return mask.new_zeros((), dtype=torch.float)


@register_correction("none")
def no_correction(
    old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor
) -> CorrectionOutput:
    """The loss as if the generator's samples were the old policy's."""
    return CorrectionOutput(None, None, {"masked_fraction": zero_like(mask)})


@register_correction("token_tis")
def token_tis(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    cap: float = 2.0,
) -> CorrectionOutput:
    """Token-level truncated IS: ``min(pi_old / pi_rollout, cap)`` per token (veRL's
    ``rollout_is: token`` with a float threshold; rlfleet's ``tis_cap``). Biased, low variance."""
    weights = truncated_importance_weights(old_logprobs, rollout_logprobs, cap)
    raw = torch.exp(safe_log_ratio(old_logprobs, rollout_logprobs))
    metrics = {
        "is_weight_mean": masked_mean(weights, mask),
        "ratio_fraction_high": masked_mean((raw > cap).float(), mask),
        "ratio_fraction_low": masked_mean((raw < 1.0 / cap).float(), mask),
        "masked_fraction": zero_like(mask),
    }
    return CorrectionOutput(weights, None, metrics)


def sequence_log_ratios(
    old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``log prod_t pi_old / pi_rollout`` per row, ``[batch, 1]``: the sum of the unclamped token
    log ratios, then clamped (veRL's ``rollout_is: sequence``)."""
    return row_sums(old_logprobs - rollout_logprobs, mask).unsqueeze(-1)


@register_correction("seq_tis")
def seq_tis(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    cap: float = 2.0,
) -> CorrectionOutput:
    """Sequence-level truncated IS: every token of a row weighted by ``min(prod_t rho_t, cap)``
    (veRL's ``rollout_is: sequence`` with a float threshold). Unbiased for a whole-sequence
    reward before the cap, high variance."""
    log_ratio = sequence_log_ratios(old_logprobs, rollout_logprobs, mask)
    safe = torch.clamp(log_ratio, -SAFETY_BOUND, SAFETY_BOUND)
    weights = (torch.exp(safe).expand_as(mask) * mask).clamp(max=cap)
    metrics = {
        "is_weight_mean": masked_mean(weights, mask),
        "ratio_fraction_high": (log_ratio > math.log(cap)).float().mean(),
        "ratio_fraction_low": (log_ratio < math.log(1.0 / cap)).float().mean(),
        "masked_fraction": zero_like(mask),
    }
    return CorrectionOutput(weights, None, metrics)


@register_correction("icepop")
def icepop(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    low: float = 0.5,
    high: float = 5.0,
) -> CorrectionOutput:
    """Token-level IcePop: a token whose ratio ``pi_old / pi_rollout`` lies outside
    ``[low, high]`` gets weight 0, the others their ratio (veRL's ``rollout_is: token`` with a
    ``"low_high"`` threshold). As IcePop's loss, the dropped tokens still count in the loss's
    denominators (as zeros): ``keep_mask`` is None."""
    raw = torch.exp(safe_log_ratio(old_logprobs, rollout_logprobs)) * mask
    inside = (raw >= low) & (raw <= high)
    weights = torch.where(inside, raw, torch.zeros_like(raw))
    metrics = {
        "is_weight_mean": masked_mean(weights, mask),
        "ratio_fraction_high": masked_mean((raw > high).float(), mask),
        "ratio_fraction_low": masked_mean((raw < low).float(), mask),
        "masked_fraction": masked_mean((~inside).float(), mask),
    }
    return CorrectionOutput(weights, None, metrics)


SEQUENCE_AGGREGATES = {"product": row_sums, "geometric": row_means}
"""A sequence's log ratio from its tokens': the log of the product or of the geometric mean."""


@register_correction("seq_mis")
def seq_mis(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    low: float = 0.5,
    high: float = 2.0,
    aggregate: str = "product",
    cap: float | None = None,
) -> CorrectionOutput:
    """Sequence-level masked IS (rejection): a row whose sequence ratio (``aggregate``: the
    product of its token ratios, or their geometric mean) lies outside ``[low, high]`` leaves the
    loss entirely (veRL's ``rollout_rs: seq_sum_k1`` / ``seq_mean_k1``); with ``cap`` the rows
    also get ``seq_tis`` weights (veRL's ``decoupled_seq_is_rs`` preset: Seq-MIS).

    veRL states the k1 bounds on ``pi_rollout / pi_old``; ``[low, high]`` here bound
    ``pi_old / pi_rollout``, veRL's ``"{1/high}_{1/low}"`` (the same for ``low = 1/high``)."""
    if aggregate not in SEQUENCE_AGGREGATES:
        raise ValueError(
            f"aggregate must be one of {sorted(SEQUENCE_AGGREGATES)}, not {aggregate!r}"
        )
    statistic = SEQUENCE_AGGREGATES[aggregate](safe_log_ratio(old_logprobs, rollout_logprobs), mask)
    kept_rows = (statistic >= math.log(low)) & (statistic <= math.log(high))
    keep = kept_rows.unsqueeze(-1).expand_as(mask).to(old_logprobs.dtype)
    present = mask.sum(-1) > 0
    metrics = {
        "masked_fraction": masked_mean(1.0 - keep, mask),
        "seq_masked_fraction": (present & ~kept_rows).float().mean(),
    }
    weights = None
    if cap is not None:
        weights, _, is_metrics = seq_tis(old_logprobs, rollout_logprobs, mask, cap=cap)
        metrics = {**is_metrics, **metrics}
    return CorrectionOutput(weights, keep, metrics)


@dataclass(frozen=True)
class ResolvedCorrection:
    """A correction chosen once (by name, with its parameters): call it as
    ``(old_logprobs, rollout_logprobs, mask) -> CorrectionOutput``."""

    name: str = "none"
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        function = ROLLOUT_CORRECTIONS[self.name]
        accepted = [
            p.name
            for p in inspect.signature(function).parameters.values()
            if p.kind is p.KEYWORD_ONLY
        ]
        unknown = sorted(set(self.params) - set(accepted))
        if unknown:
            raise ValueError(
                f"rollout correction {self.name!r} takes {accepted or 'no parameters'}, "
                f"not {unknown}"
            )

    def __call__(
        self, old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor
    ) -> CorrectionOutput:
        function = ROLLOUT_CORRECTIONS[self.name]
        return function(old_logprobs, rollout_logprobs, mask, **self.params)

    @property
    def drops_tokens(self) -> bool:
        """Whether its ``keep_mask`` may take tokens out (see :data:`DROPS_TOKENS`)."""
        return self.name in DROPS_TOKENS

    @property
    def token_cap(self) -> float | None:
        """The cap of token-level TIS (what ``rollout/tis_capped_fraction`` measures), else
        None."""
        return self.params.get("cap", 2.0) if self.name == "token_tis" else None


def mismatch_metrics(
    old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """How far the generator's policy is from the learner's old one, on the mask-1 tokens (veRL
    0.9.1's ``compute_offpolicy_metrics``, its names): ``kl`` (``E[log pi_rollout - log pi_old]``),
    ``k3_kl`` (``E[rho - log rho - 1]``, ``rho = pi_old / pi_rollout``, never negative), each
    policy's perplexity (``*_ppl``: the batch mean of the rows' ``exp(-mean logprob)``), the
    rows' log-perplexity differences, and the chi-squared divergences ``E[rho^2] - 1`` per token
    and per sequence (the variance of the IS weights a correction would apply)."""
    log_ratio = old_logprobs - rollout_logprobs
    training_mean = row_means(old_logprobs, mask)
    rollout_mean = row_means(rollout_logprobs, mask)
    log_ppl_diff = rollout_mean - training_mean
    rho = torch.exp(safe_log_ratio(old_logprobs, rollout_logprobs))
    sequence = torch.clamp(row_sums(log_ratio, mask), -SAFETY_BOUND, SAFETY_BOUND)
    return {
        "training_ppl": torch.exp(-training_mean).mean(),
        "training_log_ppl": (-training_mean).mean(),
        "kl": masked_mean(-log_ratio, mask),
        "k3_kl": masked_mean(torch.exp(log_ratio) - log_ratio - 1, mask),
        "rollout_ppl": torch.exp(-rollout_mean).mean(),
        "rollout_log_ppl": (-rollout_mean).mean(),
        "log_ppl_diff": log_ppl_diff.mean(),
        "log_ppl_abs_diff": log_ppl_diff.abs().mean(),
        "log_ppl_diff_max": log_ppl_diff.max(),
        "log_ppl_diff_min": log_ppl_diff.min(),
        "ppl_ratio": torch.exp(log_ppl_diff).mean(),
        "chi2_token": masked_mean(rho.square(), mask) - 1.0,
        "chi2_seq": torch.exp(2.0 * sequence).mean() - 1.0,
    }
