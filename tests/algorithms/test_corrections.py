"""algorithms/corrections.py's behaviour beyond veRL's numbers, and the config that picks one."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from rlfleet.algorithms.corrections import ResolvedCorrection
from rlfleet.algorithms.losses import truncated_importance_weights
from rlfleet.common.config import CriticFreeConfig, PPOConfig
from rlfleet.common.trainer_configs import RolloutCorrectionConfig

OLD = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -2.0, -3.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def test_token_tis_is_the_existing_truncated_importance_weights() -> None:
    behaviour = OLD - torch.tensor([[0.0, 2.0, -1.0], [0.5, 0.0, 9.0]])
    weights = ResolvedCorrection("token_tis", {"cap": 2.0})(OLD, behaviour, MASK).weights
    assert torch.equal(weights, truncated_importance_weights(OLD, behaviour, 2.0))


def test_seq_mis_drops_whole_rows_outside_the_bounds_and_only_those() -> None:
    """Row 0's product ratio is e^1.5 (out of [0.5, 2]); row 1's is 1 (its padding, a log ratio
    of 9, is not read)."""
    behaviour = OLD - torch.tensor([[0.5, 0.5, 0.5], [0.3, -0.3, 9.0]])
    output = ResolvedCorrection("seq_mis", {"low": 0.5, "high": 2.0})(OLD, behaviour, MASK)
    assert torch.equal(output.keep_mask, torch.tensor([[0.0] * 3, [1.0] * 3]))
    assert output.weights is None
    assert output.metrics["masked_fraction"] == pytest.approx(3 / 5)
    assert output.metrics["seq_masked_fraction"] == pytest.approx(1 / 2)


def test_icepop_zeroes_the_out_of_bounds_tokens_but_keeps_them_in_the_mask() -> None:
    behaviour = OLD - torch.tensor([[0.0, 2.0, -2.0], [0.1, 0.0, 0.0]])
    output = ResolvedCorrection("icepop", {"low": 0.5, "high": 5.0})(OLD, behaviour, MASK)
    assert output.keep_mask is None
    assert torch.equal(output.weights[0] == 0, torch.tensor([False, True, True]))
    assert output.metrics["masked_fraction"] == pytest.approx(2 / 5)


def test_a_parameter_the_correction_does_not_read_is_refused() -> None:
    with pytest.raises(ValueError, match="'icepop' takes \\['low', 'high'\\], not \\['cap'\\]"):
        ResolvedCorrection("icepop", {"cap": 2.0})
    with pytest.raises(KeyError, match="unknown rollout correction 'mis'"):
        ResolvedCorrection("mis")


def test_tis_cap_keeps_working_as_before_when_no_other_correction_is_chosen() -> None:
    assert CriticFreeConfig().correction == ("token_tis", {"cap": 2.0})
    assert CriticFreeConfig(tis_cap=None).correction == ("none", {})
    assert PPOConfig().correction == ("none", {})
    assert PPOConfig(tis_cap=3.0).correction == ("token_tis", {"cap": 3.0})


def test_a_rollout_correction_mode_replaces_the_default_tis_cap() -> None:
    section = {"mode": "seq_mis", "low": 0.8, "aggregate": "geometric"}
    config = CriticFreeConfig(rollout_correction=section)
    assert config.correction == ("seq_mis", {"low": 0.8, "aggregate": "geometric"})
    assert ResolvedCorrection(*config.correction).token_cap is None


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: PPOConfig(tis_cap=2.0, rollout_correction={"mode": "icepop"}),
            "tis_cap and rollout_correction \\(mode icepop\\) both set",
        ),
        (
            lambda: RolloutCorrectionConfig(mode="token_tis", low=0.5),
            "mode token_tis does not read \\['low'\\]",
        ),
        (lambda: RolloutCorrectionConfig(mode="icepop", low=2.0, high=1.0), "low \\(2.0\\) > high"),
        (lambda: RolloutCorrectionConfig(mode="seq_mis", aggregate="mean"), "aggregate"),
    ],
)
def test_a_contradictory_correction_config_is_refused(build, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        build()
