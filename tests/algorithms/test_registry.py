"""The registries: names to functions, with errors that say what is known."""

from __future__ import annotations

import pytest

from rlfleet.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    gae,
    grpo,
    masked_gae,
    reinforce_pp,
    reinforce_pp_baseline,
    rloo,
)
from rlfleet.algorithms.kl import KL_PENALTIES
from rlfleet.algorithms.losses import (
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    VALUE_LOSSES,
    clipped_policy_loss,
    clipped_value_loss,
    sequence_mean_of_token_means,
    sequence_mean_of_token_sums,
    sequence_mean_of_token_sums_over_width,
)
from rlfleet.algorithms.masked import masked_mean
from rlfleet.algorithms.registry import Registry


def test_register_looks_up_by_name_and_refuses_a_second_function_under_one_name():
    registry: Registry = Registry("widget")

    @registry.register("double")
    def double(x: int) -> int:
        return 2 * x

    assert registry["double"] is double and registry["double"](3) == 6
    with pytest.raises(ValueError, match="widget 'double' is already registered"):
        registry.register("double")(lambda x: x)
    with pytest.raises(KeyError, match="unknown widget 'triple'; known: double"):
        registry["triple"]


def test_the_registered_pieces():
    assert dict(ADVANTAGE_ESTIMATORS) == {
        "gae": gae,
        "masked_gae": masked_gae,
        "grpo": grpo,
        "rloo": rloo,
        "reinforce_pp": reinforce_pp,
        "reinforce_pp_baseline": reinforce_pp_baseline,
    }
    assert dict(POLICY_LOSSES) == {"clipped": clipped_policy_loss}
    assert dict(VALUE_LOSSES) == {"clipped": clipped_value_loss}
    assert dict(LOSS_AGGREGATIONS) == {
        "token-mean": masked_mean,
        "seq-mean-token-sum": sequence_mean_of_token_sums,
        "seq-mean-token-sum-norm": sequence_mean_of_token_sums_over_width,
        "seq-mean-token-mean": sequence_mean_of_token_means,
    }
    assert sorted(KL_PENALTIES) == ["abs", "full", "k3", "kl", "mse"]
