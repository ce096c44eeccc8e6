"""Statistics over the tokens a ``mask`` selects (1 on tokens that count, 0 elsewhere).

As TRL v0.11.4's, with one departure: a variance of fewer than two values is the (zero) biased
variance instead of ``x / 0`` (NaN).
"""

from __future__ import annotations

import torch

WHITEN_EPS = 1e-8


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1; 0 where it is 1 nowhere (a micro-batch of rows
    the mask hides entirely: dropped agent trajectories)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


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
        return values.new_zeros(())
    return values.std()
