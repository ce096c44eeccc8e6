"""learner/batches.py on multi-turn batches: loss masks and turn rewards to step inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.batches import scored_batch

from rlfleet.learner.batches import generator_mismatch_stats, multi_turn_inputs
from rlfleet.learner.registry import TRAINERS


def multi_turn(**columns) -> object:
    """Two rollouts of 5 and 3 response tokens; the first with an environment span."""
    defaults = {
        "response_ids": [[3, 4, 5, 6, 7], [8, 9, 10]],
        "response_logprobs": [[-1.0, -1.0, 0.0, 0.0, -2.0], [-0.5, -0.5, -0.5]],
        "loss_mask": [[1, 1, 0, 0, 1], [1, 1, 1]],
        "turn_ends": [[1, 4], [2]],
        "turn_rewards": [[0.5, 0.0], [0.0]],
    }
    return scored_batch([10, 11], [1.0, 2.0], **(defaults | columns))


def test_a_single_turn_batch_gives_no_multi_turn_inputs():
    assert multi_turn_inputs(scored_batch([1, 2], response_ids=[[3], [4, 5]])) == {}


def test_loss_masks_and_turn_rewards_at_their_turn_ends():
    inputs = multi_turn_inputs(multi_turn())
    assert [m.tolist() for m in inputs["loss_masks"]] == [[1, 1, 0, 0, 1], [1, 1, 1]]
    assert [r.tolist() for r in inputs["token_rewards"]] == [[0, 0.5, 0, 0, 0], [0, 0, 0]]
    assert inputs["loss_masks"][0].dtype == torch.long
    assert inputs["token_rewards"][0].dtype == torch.float32


def test_no_token_rewards_when_every_turn_reward_is_zero_or_absent():
    assert "token_rewards" not in multi_turn_inputs(multi_turn(turn_rewards=[[0.0, 0.0], None]))
    assert "token_rewards" not in multi_turn_inputs(multi_turn(turn_rewards=[None, None]))


def test_a_row_without_a_loss_mask_in_a_multi_turn_batch_counts_every_token():
    inputs = multi_turn_inputs(multi_turn(loss_mask=[[1, 1, 0, 0, 1], None]))
    assert inputs["loss_masks"][1].tolist() == [1, 1, 1]


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"loss_mask": [[1, 1, 0, 1], [1, 1, 1]]}, "rollout 10: 4 loss_mask entries for 5 tokens"),
        ({"loss_mask": [[1, 1, 0, 0, 1], [0, 2, 0]]}, "rollout 11: loss_mask must hold 0s and 1s"),
        ({"loss_mask": [[1, 2, 0, 0, 1], [1, 1, 1]]}, "rollout 10: loss_mask must hold 0s and 1s"),
        ({"turn_ends": [[1], [2]]}, "rollout 10: 2 turn_rewards for 1 turn_ends"),
        ({"turn_ends": [None, [2]]}, "rollout 10: 2 turn_rewards for no turn_ends"),
        ({"turn_ends": [[2, 4], [2]]}, "rollout 10: turn end 2 is not a sampled token"),
        ({"turn_ends": [[1, 5], [2]]}, "rollout 10: turn end 5 is not a sampled token"),
        ({"turn_rewards": [[float("nan"), 0.0], [0.0]]}, "rollout 10: turn reward nan"),
    ],
)
def test_mismatches_name_the_rollout(columns, message):
    with pytest.raises(ValueError, match=message):
        multi_turn_inputs(multi_turn(**columns))


def test_a_row_of_zeros_is_a_dropped_trajectory_trained_on_nothing():
    """A dropped agent trajectory (actors/agent_rollout.py) keeps its row with a loss mask of
    zeros and no turns: it passes as it is (the trainer refuses a batch that is all zeros)."""
    inputs = multi_turn_inputs(
        multi_turn(
            loss_mask=[[1, 1, 0, 0, 1], [0, 0, 0]],
            turn_ends=[[1, 4], []],
            turn_rewards=[[0.5, 0.0], []],
        )
    )
    assert [m.tolist() for m in inputs["loss_masks"]] == [[1, 1, 0, 0, 1], [0, 0, 0]]
    assert inputs["token_rewards"][1].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "reinforce_pp"])
def test_every_trainer_spec_passes_them_to_step(algorithm):
    inputs = TRAINERS[algorithm].inputs(TRAINERS[algorithm].order(multi_turn()))
    assert [m.tolist() for m in inputs["loss_masks"]] == [[1, 1, 0, 0, 1], [1, 1, 1]]
    assert inputs["token_rewards"][0].tolist() == [0, 0.5, 0, 0, 0]
    single = TRAINERS[algorithm].inputs(scored_batch([1], response_logprobs=[[-1.0]]))
    assert "loss_masks" not in single and "token_rewards" not in single


def test_the_generator_mismatch_counts_sampled_tokens_only():
    """An environment token's logprob is 0 on both sides; it must not dilute the mean."""
    old = np.array([[-1.5, -1.5, 0.0, 0.0, -2.5], [-0.5, -0.5, -0.5, 0.0, 0.0]])
    stats = generator_mismatch_stats(multi_turn(), old)
    assert stats["rollout/logprob_diff_mean"] == pytest.approx((0.5 + 0.5 + 0.5) / 6)
