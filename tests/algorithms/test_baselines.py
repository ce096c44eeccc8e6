"""Group baselines and the critic-free advantage estimators on hand-worked numbers."""

from __future__ import annotations

import math

import pytest
import torch

from rlfleet.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageConfig,
    discounted_returns,
)
from rlfleet.algorithms.baselines import (
    group_mean_baseline,
    group_nanmean,
    group_nanstd,
    group_normalized_advantages,
    leave_one_out_advantages,
)
from rlfleet.algorithms.masked import WHITEN_EPS

NAN = float("nan")
ONE_GROUP = torch.zeros(4, dtype=torch.long)
# Groups 0 = {1, 3} and 1 = {2, 6}, interleaved: means 2 and 4, unbiased stds sqrt(2), sqrt(8).
INTERLEAVED_SCORES = torch.tensor([1.0, 2.0, 3.0, 6.0])
INTERLEAVED_GROUPS = torch.tensor([5, 9, 5, 9])


def close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), rtol=1e-6, atol=1e-7)


def test_group_statistics_of_interleaved_groups():
    close(group_nanmean(INTERLEAVED_SCORES, INTERLEAVED_GROUPS), [2.0, 4.0, 2.0, 4.0])
    root2, root8 = math.sqrt(2), math.sqrt(8)
    close(group_nanstd(INTERLEAVED_SCORES, INTERLEAVED_GROUPS), [root2, root8, root2, root8])


def test_nan_scores_are_left_out_and_a_group_of_one_has_no_std():
    scores = torch.tensor([1.0, NAN, 3.0, 5.0, 7.0])
    groups = torch.tensor([0, 0, 0, 0, 1])
    close(group_nanmean(scores, groups), [3.0, 3.0, 3.0, 3.0, 7.0])
    std = group_nanstd(scores, groups)
    close(std[:4], [2.0] * 4)
    assert std[4].isnan()


def test_grpo_all_equal_scores_give_zero_advantages():
    assert group_normalized_advantages(torch.ones(4), ONE_GROUP).tolist() == [0.0] * 4


def test_grpo_one_distinct_score():
    # Mean 0.25, unbiased variance (3 * 0.25^2 + 0.75^2) / 3 = 0.25, std 0.5, plus eps 1e-4.
    advantages = group_normalized_advantages(torch.tensor([0.0, 0.0, 0.0, 1.0]), ONE_GROUP)
    close(advantages, [-0.25 / 0.5001] * 3 + [0.75 / 0.5001])


def test_grpo_groups_need_not_be_adjacent():
    advantages = group_normalized_advantages(INTERLEAVED_SCORES, INTERLEAVED_GROUPS, std_eps=0.0)
    half = 1 / math.sqrt(2)
    close(advantages, [-half, -half, half, half])
    adjacent = group_normalized_advantages(
        INTERLEAVED_SCORES[[0, 2, 1, 3]], torch.tensor([0, 0, 1, 1]), std_eps=0.0
    )
    assert torch.equal(adjacent, advantages[[0, 2, 1, 3]])


def test_grpo_scale_rewards_batch_and_none():
    centred = [-1.0, -2.0, 1.0, 2.0]
    none = group_normalized_advantages(INTERLEAVED_SCORES, INTERLEAVED_GROUPS, "none")
    close(none, centred)
    # Centred on each group's mean, divided by the batch's std: mean 3, squares 4+1+0+9 over 3.
    batch = group_normalized_advantages(INTERLEAVED_SCORES, INTERLEAVED_GROUPS, "batch", 0.0)
    close(batch, [a / math.sqrt(14 / 3) for a in centred])
    with pytest.raises(ValueError, match="scale_rewards must be group, batch or none"):
        group_normalized_advantages(INTERLEAVED_SCORES, INTERLEAVED_GROUPS, "sequence")


def test_grpo_unscorable_sample_and_group_of_one_get_zero():
    scores = torch.tensor([1.0, NAN, 3.0, 5.0, 7.0])
    groups = torch.tensor([0, 0, 0, 0, 1])
    close(group_normalized_advantages(scores, groups, std_eps=0.0), [-1.0, 0.0, 0.0, 1.0, 0.0])


def test_rloo_subtracts_the_mean_of_the_others():
    # Baselines (2+3+6)/3, (1+3+6)/3, (1+2+6)/3, (1+2+3)/3.
    advantages = leave_one_out_advantages(INTERLEAVED_SCORES, ONE_GROUP)
    close(advantages, [-8 / 3, -4 / 3, 0.0, 4.0])
    assert leave_one_out_advantages(torch.ones(4), ONE_GROUP).tolist() == [0.0] * 4
    close(leave_one_out_advantages(INTERLEAVED_SCORES, INTERLEAVED_GROUPS), [-2.0, -4.0, 2.0, 4.0])


def test_rloo_leaves_out_unscorable_samples_and_zeroes_a_group_of_one():
    scores = torch.tensor([1.0, NAN, 3.0, 5.0, 7.0])
    groups = torch.tensor([0, 0, 0, 0, 1])
    close(leave_one_out_advantages(scores, groups), [-3.0, 0.0, 0.0, 3.0, 0.0])


def test_rloo_normalized_over_the_batch():
    # A = (-8/3, -4/3, 0, 4): mean 0, unbiased variance (64/9 + 16/9 + 16) / 3 = 224/27.
    advantages = leave_one_out_advantages(INTERLEAVED_SCORES, ONE_GROUP, True, std_eps=0.0)
    std = math.sqrt(224 / 27)
    close(advantages, [-8 / 3 / std, -4 / 3 / std, 0.0, 4 / std])


def test_group_mean_baseline_keeps_the_score_of_a_group_of_one():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 7.0])
    close(group_mean_baseline(scores, torch.tensor([0, 0, 0, 0, 1])), [-2.0, -1.0, 0.0, 3.0, 7.0])


def test_grpo_and_rloo_estimators_put_each_sample_advantage_on_its_tokens():
    # Scores 1 and 0 on the last token of responses of 3 and 2 tokens: mean 0.5, std sqrt(0.5).
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    groups = torch.tensor([3, 3])
    half = 1 / math.sqrt(2)
    config = AdvantageConfig(std_eps=0.0)
    advantages, returns = ADVANTAGE_ESTIMATORS["grpo"](rewards, mask, None, groups, config)
    close(advantages, [[half] * 3, [-half, -half, 0.0]])
    assert torch.equal(returns, advantages)
    advantages, _ = ADVANTAGE_ESTIMATORS["rloo"](rewards, mask, None, groups, config)
    close(advantages, [[1.0] * 3, [-1.0, -1.0, 0.0]])


def test_outcome_estimators_sum_a_per_token_kl_penalty_into_the_score():
    # Score 1 with a -0.25 penalty on each of two tokens counts as 0.5 against the other's 0.
    rewards = torch.tensor([[-0.25, 0.75], [0.0, 0.0]])
    advantages, _ = ADVANTAGE_ESTIMATORS["rloo"](
        rewards, torch.ones(2, 2), None, torch.tensor([0, 0]), AdvantageConfig()
    )
    close(advantages, [[0.5, 0.5], [-0.5, -0.5]])


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce_pp_baseline"])
def test_group_estimators_need_group_ids(name):
    with pytest.raises(ValueError, match=f"the {name} advantage estimator needs"):
        ADVANTAGE_ESTIMATORS[name](
            torch.ones(2, 2), torch.ones(2, 2), None, None, AdvantageConfig()
        )


def test_discounted_returns_carry_the_return_across_a_masked_out_token():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 1]])
    close(discounted_returns(rewards, mask, gamma=0.5), [[0.25, 0.5, 1.0], [0.5, 0.0, 1.0]])


def test_reinforce_pp_whitens_the_returns_over_the_batch_tokens():
    rewards = torch.tensor([[0.0, 1.0], [3.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    advantages, returns = ADVANTAGE_ESTIMATORS["reinforce_pp"](
        rewards, mask, None, None, AdvantageConfig(gamma=1.0)
    )
    close(returns, [[1.0, 1.0], [3.0, 0.0]])
    # Returns 1, 1, 3: mean 5/3, unbiased variance (4/9 + 4/9 + 16/9) / 2 = 4/3.
    scale = 1 / math.sqrt(4 / 3 + WHITEN_EPS)
    close(advantages, [[-2 / 3 * scale, -2 / 3 * scale], [4 / 3 * scale, 0.0]])


def test_reinforce_pp_baseline_whitens_group_centred_scores_over_the_batch_tokens():
    # Scores 1 and 3 of one group: -1 on two tokens, +1 on one; mean -1/3, variance 4/3.
    rewards = torch.tensor([[0.0, 1.0], [3.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    advantages, returns = ADVANTAGE_ESTIMATORS["reinforce_pp_baseline"](
        rewards, mask, None, torch.tensor([0, 0]), AdvantageConfig()
    )
    scale = 1 / math.sqrt(4 / 3 + WHITEN_EPS)
    close(advantages, [[-2 / 3 * scale, -2 / 3 * scale], [4 / 3 * scale, 0.0]])
    assert torch.equal(returns, advantages)
