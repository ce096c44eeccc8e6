"""DAPO's sampling control (``rlfleet.algorithms.sampling``): its behaviour beyond the stored
veRL cases (test_dapo_parity.py): arguments refused, group order, ids, bounds."""

from __future__ import annotations

import pytest
import torch

from rlfleet.algorithms.sampling import (
    GROUP_FILTERS,
    LENGTH_PENALTIES,
    REFILL_PER_DROPPED,
    dynamic_sampling_keep,
    fill_batch,
    group_values,
    has_reward_variance,
    may_generate_again,
    metric_values,
    overlong_penalty,
    refill_dispatch,
)


def test_overlong_penalty_is_zero_until_the_buffer_then_linear_to_minus_factor() -> None:
    penalty = overlong_penalty([0, 5, 6, 7, 8, 9, 10], 10, 4, 2.0)
    assert penalty.tolist() == [0.0, 0.0, 0.0, -0.5, -1.0, -1.5, -2.0]


def test_overlong_penalty_takes_a_tensor_and_keeps_its_length() -> None:
    lengths = torch.tensor([3, 8], dtype=torch.int32)
    assert overlong_penalty(lengths, 8, 2, 1.0).tolist() == [0.0, -1.0]
    assert overlong_penalty([], 8, 2, 1.0).shape == (0,)


@pytest.mark.parametrize(
    ("lengths", "max_len", "buffer", "message"),
    [
        ([1], 8, 0, "overlong_buffer_len must be positive"),
        ([1], 3, 4, "below overlong_buffer_len"),
        ([9], 8, 2, r"outside \[0, 8\]"),
        ([-1], 8, 2, r"outside \[0, 8\]"),
        ([1.5], 8, 2, "integer"),
    ],
)
def test_overlong_penalty_refuses_what_veRL_asserts_against(
    lengths: list, max_len: int, buffer: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        overlong_penalty(lengths, max_len, buffer, 1.0)


def test_registries_list_the_known_names_on_a_typo() -> None:
    assert GROUP_FILTERS["zero_std"] is has_reward_variance
    with pytest.raises(KeyError, match="dapo_overlong"):
        LENGTH_PENALTIES["dapo_overlng"]
    with pytest.raises(KeyError, match="zero_std"):
        dynamic_sampling_keep([0], [1.0], group_filter="std0")


def test_groups_keep_their_first_appearance_order_and_need_not_be_adjacent() -> None:
    split = dynamic_sampling_keep([7, 3, 7, 5, 3, 5], [1.0, 0.0, 0.0, 1.0, 0.0, 1.0])
    assert split.kept == (7,)
    assert split.dropped == (3, 5)
    assert list(group_values([7, 3, 7], [1, 2, 3])) == [7, 3]


def test_a_group_of_one_is_kept_and_equal_groups_are_dropped() -> None:
    assert has_reward_variance([0.0])
    assert not has_reward_variance([0.5, 0.5])
    assert has_reward_variance([0.5, 0.25])
    split = dynamic_sampling_keep(["a", "b", "b"], [1.0, 1.0, 1.0])
    assert split.kept == ("a",) and split.dropped == ("b",)


def test_group_ids_and_values_must_pair_up() -> None:
    with pytest.raises(ValueError, match="2 values for 3 group ids"):
        dynamic_sampling_keep([0, 0, 1], [1.0, 0.0])


def test_metric_values_read_the_score_or_a_component() -> None:
    components = [{"acc": 1.0, "format": 0.5}, {"acc": 0.0}]
    assert metric_values([0.25, -1.0]) == [0.25, -1.0]
    assert metric_values([0.25, -1.0], components, "acc") == [1.0, 0.0]
    with pytest.raises(ValueError, match=r"samples \[1\] have no score component 'format'"):
        metric_values([0.25, -1.0], components, "format")
    with pytest.raises(ValueError, match="one score-components mapping per sample"):
        metric_values([0.25, -1.0], None, "acc")
    with pytest.raises(ValueError, match=r"samples \[0\]"):
        metric_values([0.25], [None], "acc")


def test_fill_batch_takes_the_oldest_kept_and_names_the_surplus() -> None:
    fill = fill_batch([4, 1, 9, 2], 3)
    assert fill.batch == (4, 1, 9) and fill.surplus == (2,) and fill.missing == 0
    short = fill_batch([4], 3)
    assert short.batch == (4,) and short.surplus == () and short.missing == 2
    with pytest.raises(ValueError, match="target_groups"):
        fill_batch([1], -1)


def test_refill_over_samples_two_per_dropped_group_within_the_free_slots() -> None:
    assert REFILL_PER_DROPPED == 2
    assert refill_dispatch(0, 3, 8) == (6, 0)
    assert refill_dispatch(0, 3, 4) == (4, 2)  # what does not fit waits
    assert refill_dispatch(2, 0, 4) == (2, 0)
    assert refill_dispatch(2, 1, 8, inflight=6) == (2, 2)
    assert refill_dispatch(0, 5, 4, inflight=9) == (0, 10)
    with pytest.raises(ValueError, match=">= 0"):
        refill_dispatch(0, -1, 4)


def test_generation_rounds_are_bounded_by_max_rounds_unless_it_is_not_positive() -> None:
    assert may_generate_again(1, 3) and may_generate_again(2, 3)
    assert not may_generate_again(3, 3)
    assert may_generate_again(1000, 0) and may_generate_again(1000, -1)
