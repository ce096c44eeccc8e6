"""Masked statistics on hand-worked numbers."""

from __future__ import annotations

import math

import pytest
import torch

from rlfleet.algorithms.masked import (
    WHITEN_EPS,
    masked_mean,
    masked_var,
    masked_whiten,
    std,
)


def test_masked_moments_and_whitening():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert masked_mean(values, mask).item() == 2.0
    assert masked_var(values, mask).item() == 1.0
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(2 / 3)
    whitened = masked_whiten(values, mask)
    scale = 1 / math.sqrt(1 + WHITEN_EPS)
    torch.testing.assert_close(whitened[0, :3], torch.tensor([-scale, 0.0, scale]))
    shifted = masked_whiten(values, mask, shift_mean=False)
    torch.testing.assert_close(shifted[0, :3], torch.tensor([2 - scale, 2.0, 2 + scale]))


def test_one_value_has_zero_variance_not_nan():
    one = torch.tensor([[0.7, 5.0]])
    mask = torch.tensor([[1, 0]])
    assert masked_var(one, mask).item() == 0.0
    assert masked_whiten(one, mask)[0, 0].item() == 0.0
    assert std(torch.tensor([3.0])).item() == 0.0
    assert std(torch.tensor([1.0, 3.0])).item() == pytest.approx(math.sqrt(2))
    with pytest.raises(ValueError, match="no values"):
        masked_var(one, torch.zeros(1, 2))
