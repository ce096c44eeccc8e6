"""``step``'s stats: TRL's keys and conventions from the rollout and the minibatches."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from rlfleet.trainers.forward import ResponseBatch, Rollout
from rlfleet.trainers.stats import StepTimer, as_python, step_stats


def test_step_timer_reports_each_phase_and_the_total():
    timer = StepTimer()
    with timer.phase("forward_pass"):
        time.sleep(0.01)
    stats = timer.stats()
    assert set(stats) == {"time/ppo/forward_pass", "time/ppo/total"}
    assert 0.01 <= stats["time/ppo/forward_pass"] <= stats["time/ppo/total"]


def test_single_values_become_floats_and_longer_ones_arrays():
    assert as_python(torch.tensor(2.5)) == 2.5 and type(as_python(torch.tensor([3]))) is float
    assert as_python(np.float32(1.5)) == 1.5 and type(as_python(4)) is float
    array = as_python(torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert isinstance(array, np.ndarray) and array.dtype == np.float32


def test_step_stats_from_a_hand_made_rollout_and_two_minibatches():
    batch = ResponseBatch.build(
        [torch.tensor([1, 2, 3]), torch.tensor([4])],
        [torch.tensor([5, 6]), torch.tensor([7])],
        None,
    )
    rollout = Rollout(
        logprobs=torch.tensor([[-1.0, -2.0], [-3.0, 0.0]]),
        ref_logprobs=torch.tensor([[-1.5, -2.0], [-2.0, 0.0]]),
        values=torch.zeros(2, 2),
        kls=torch.tensor([[0.5, 0.0], [-1.0, 9.0]]),  # 9.0 sits on padding
    )
    minibatches = [
        {
            "loss/total": torch.tensor(1.0),
            "policy/ratio": torch.tensor([1.0, 2.0]),
            "returns/var": torch.tensor(0.0),
            "val/error": torch.tensor(3.0),
        },
        {
            "loss/total": torch.tensor(3.0),
            "policy/ratio": torch.tensor([4.0]),
            "returns/var": torch.tensor(0.0),
            "val/error": torch.tensor(5.0),
        },
    ]
    stats = step_stats(
        batch,
        torch.tensor([1.0, 3.0]),
        rollout,
        torch.tensor([[-0.1, 0.0], [0.2, 0.0]]),
        minibatches,
        kl_coef=0.2,
        learning_rate=1e-3,
    )
    assert stats["objective/kl_dist"].tolist() == [0.5, -1.0]
    assert stats["objective/kl"] == -0.25
    assert stats["objective/entropy"] == 3.0  # mean of summed -logprobs (3, 3)
    assert stats["ppo/mean_non_score_reward"] == pytest.approx(0.1 / 3)
    assert stats["ppo/mean_scores"] == 2.0 and stats["ppo/std_scores"] == pytest.approx(2**0.5)
    assert stats["tokens/queries_dist"].tolist() == [3.0, 1.0]
    assert stats["tokens/responses_len_mean"] == 1.5
    assert stats["ppo/loss/total"] == 2.0
    assert stats["ppo/policy/ratio"].tolist() == [1.0, 2.0, 4.0]
    assert stats["ppo/val/var_explained"] == 0.0  # returns without variance explain nothing
    assert stats["objective/kl_coef"] == 0.2 and stats["ppo/learning_rate"] == 1e-3
