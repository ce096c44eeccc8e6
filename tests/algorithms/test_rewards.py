"""Score scaling and KL-penalized per-token rewards on hand-worked numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlfleet.algorithms.rewards import (
    RunningMoments,
    last_token_index,
    per_token_rewards,
    scaled_scores,
)


def test_rewards_put_the_score_on_each_last_response_token():
    kl = torch.tensor([[0.5, 0.25, 1.0], [1.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, non_score = per_token_rewards(torch.tensor([1.0, -2.0]), kl, mask, kl_coef=0.5)
    assert non_score.tolist() == [[-0.25, -0.125, -0.5], [-0.5, -1.0, -0.0]]
    assert rewards.tolist() == [[-0.25, -0.125, 0.5], [-0.5, -3.0, -0.0]]


def test_last_token_index_is_the_last_masked_in_position():
    mask = torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 3, 0]


def test_scores_pass_through_without_scaling_or_clipping():
    scores = torch.tensor([1.0, -7.0])
    assert torch.equal(scaled_scores(scores, RunningMoments(), False, False, None), scores)


def test_score_scaling_divides_by_the_running_std_and_norm_also_centres():
    scores = torch.tensor([1.0, 3.0])  # mean 2, unbiased std sqrt(2)
    scaled = scaled_scores(scores, RunningMoments(), True, False, None)
    torch.testing.assert_close(scaled, scores / math.sqrt(2))
    normed = scaled_scores(scores, RunningMoments(), True, True, None)
    torch.testing.assert_close(normed, torch.tensor([-1.0, 1.0]) / math.sqrt(2))
    clipped = scaled_scores(scores, RunningMoments(), True, True, 0.5)
    assert clipped.tolist() == [-0.5, 0.5]
    assert scaled_scores(
        torch.tensor([-3.0, 0.25]), RunningMoments(), False, False, 1.0
    ).tolist() == [
        -1.0,
        0.25,
    ]


def test_running_moments_match_the_whole_stream():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=n).astype(np.float32) for n in (8, 5, 16)]
    moments = RunningMoments()
    for batch in batches:
        batch_mean, batch_std = moments.update(torch.from_numpy(batch))
        assert batch_mean == pytest.approx(batch.mean(), rel=1e-5)
        assert batch_std == pytest.approx(batch.std(ddof=1), rel=1e-5)
    stream = np.concatenate(batches)
    assert moments.mean == pytest.approx(stream.mean(), rel=1e-5)
    assert moments.std == pytest.approx(stream.std(ddof=1), rel=1e-5)


def test_running_moments_of_a_single_score_stay_finite():
    moments = RunningMoments()
    assert moments.update(torch.tensor([2.0])) == (2.0, 0.0)
    assert (moments.mean, moments.std) == (2.0, 1.0)
    moments.update(torch.tensor([4.0]))
    assert moments.mean == pytest.approx(3.0)
    assert moments.std == pytest.approx(math.sqrt(2.0), rel=1e-5)


def test_running_moments_state_round_trips():
    moments = RunningMoments()
    moments.update(torch.tensor([1.0, 5.0, 6.0]))
    restored = RunningMoments()
    restored.load_state(moments.state())
    assert restored.state() == moments.state()
