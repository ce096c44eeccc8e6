"""``PPOTrainer.step``'s input checks (the trainer-level cases are in test_ppo_trainer.py)."""

from __future__ import annotations

import pytest
import torch

from rlfleet.trainers.inputs import checked_step_inputs

CPU = torch.device("cpu")


def check(queries, responses, scores, response_masks=None, batch_size=2, vocab_size=50):
    return checked_step_inputs(
        queries, responses, scores, response_masks, batch_size, vocab_size, CPU
    )


def test_good_inputs_come_back_with_scores_as_one_float32_tensor():
    queries = [torch.tensor([1, 2]), torch.tensor([3])]
    responses = [torch.tensor([4]), torch.tensor([5, 49])]
    masks = [torch.tensor([1]), torch.tensor([0, 1])]
    scores = [torch.tensor(1.5, dtype=torch.float64), torch.tensor([-2.0])]
    inputs = check(queries, responses, scores, masks)
    assert inputs.scores.dtype == torch.float32 and inputs.scores.tolist() == [1.5, -2.0]
    assert [q.tolist() for q in inputs.queries] == [[1, 2], [3]]
    assert [r.tolist() for r in inputs.responses] == [[4], [5, 49]]
    assert [m.tolist() for m in inputs.response_masks] == [[1], [0, 1]]
    assert check(queries, responses, [0.5, 2]).scores.tolist() == [0.5, 2.0]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"queries": torch.tensor([[1], [2]])}, "queries must be a list of tensors, got Tensor"),
        ({"response_masks": [torch.tensor([1])]}, "response_masks has 1 elements"),
        (
            {"response_masks": [torch.tensor([1]), torch.tensor([1])]},
            r"response_masks\[1\] must have the shape of responses\[1\]",
        ),
        ({"responses": [torch.tensor([4]), torch.tensor([-1])]}, r"responses\[1\] has token ids"),
        ({"responses": [torch.tensor([50]), torch.tensor([1])]}, r"responses\[0\] has token ids"),
        ({"queries": [torch.tensor([1.0]), torch.tensor([3])]}, r"queries\[0\] must be a 1-D"),
        ({"scores": [1.0, torch.ones(2)]}, r"scores\[1\] must be a scalar"),
    ],
)
def test_bad_inputs_name_the_list_and_index(arguments, message):
    inputs = {
        "queries": [torch.tensor([1, 2]), torch.tensor([3])],
        "responses": [torch.tensor([4]), torch.tensor([5, 6])],
        "scores": [1.0, 2.0],
    }
    with pytest.raises(ValueError, match=message):
        check(**(inputs | arguments))
