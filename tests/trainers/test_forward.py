"""The packed response forward against a plain full-sequence forward, and its autograd kernel."""

from __future__ import annotations

import copy

import pytest
import torch

from rlfleet.algorithms.kl import KL_PENALTIES
from rlfleet.trainers.forward import (
    PackedRows,
    ResponseBatch,
    TokenLogprobs,
    response_forward,
    rollout_forward,
)
from rlfleet.trainers.value_head import AutoModelForCausalLMWithValueHead

QUERIES = [torch.tensor([5, 6, 7]), torch.tensor([8]), torch.tensor([20, 21])]
RESPONSES = [torch.tensor([9, 10]), torch.tensor([11, 12, 13]), torch.tensor([30])]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLMWithValueHead.from_pretrained(tiny_model_dir).eval()


def plain_forward(model, query, response):
    """Log-distributions, values and entropies predicting each response token, from one unpadded
    forward over ``query + response``."""
    with torch.no_grad():
        logits, _, values = model(torch.cat([query, response]).unsqueeze(0))
    positions = torch.arange(len(query) - 1, len(query) - 1 + len(response))
    log_distributions = torch.log_softmax(logits[0, positions], dim=-1)
    entropy = -(log_distributions.exp() * log_distributions).sum(-1)
    return log_distributions, values[0, positions], entropy


def test_batch_mask_covers_each_response_unless_response_masks_say_otherwise():
    batch = ResponseBatch.build(QUERIES, RESPONSES, None)
    assert batch.width == 3
    assert batch.lengths.tolist() == [2, 3, 1]
    assert batch.mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]
    masks = [torch.tensor([0, 1]), torch.tensor([True, False, True]), torch.tensor([1])]
    masked = ResponseBatch.build(QUERIES, RESPONSES, masks)
    assert masked.mask.tolist() == [[0, 1, 0], [1, 0, 1], [1, 0, 0]]
    assert masked.mask.dtype == torch.long


def test_packed_rows_point_at_the_hidden_states_that_predict_each_response_token():
    packed = PackedRows.build(ResponseBatch.build(QUERIES, RESPONSES, None), [2, 0])
    assert packed.rows.tolist() == [2, 0]
    assert packed.input_ids.tolist() == [[20, 21, 30, 0, 0], [5, 6, 7, 9, 10]]
    assert packed.labels.tolist() == [30, 9, 10]
    assert [t.tolist() for t in packed.hidden_index] == [[0, 1, 1], [1, 2, 3]]
    assert [t.tolist() for t in packed.out_index] == [[0, 1, 1], [0, 0, 1]]
    unpacked = packed.unpack(torch.tensor([1.0, 2.0, 3.0]))
    assert unpacked.tolist() == [[1.0, 0.0, 0.0], [2.0, 3.0, 0.0]]


@pytest.mark.parametrize("full", [False, True])
def test_response_forward_matches_a_plain_forward_of_each_sequence(model, full):
    batch = ResponseBatch.build(QUERIES, RESPONSES, None)
    rows = [1, 0, 2]
    packed = PackedRows.build(batch, rows)
    with torch.no_grad():
        outputs = response_forward(
            model, packed, with_values=True, with_entropy=not full, with_full_logprobs=full
        )
    start = 0
    for i, row in enumerate(rows):
        response = RESPONSES[row]
        n = len(response)
        log_distributions, values, entropy = plain_forward(model, QUERIES[row], response)
        expected = log_distributions.gather(-1, response.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(outputs.logprobs[i, :n], expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(outputs.values[i, :n], values, rtol=0, atol=1e-5)
        assert not outputs.logprobs[i, n:].any() and not outputs.values[i, n:].any()
        if full:
            packed_rows = outputs.full_logprobs[start : start + n]
            torch.testing.assert_close(packed_rows, log_distributions, rtol=0, atol=1e-5)
        else:
            torch.testing.assert_close(outputs.entropy[i, :n], entropy, rtol=0, atol=1e-5)
        start += n


def test_rollout_forward_does_not_depend_on_the_chunking(model):
    batch = ResponseBatch.build(QUERIES, RESPONSES, None)
    one = rollout_forward(model, model, batch, chunk_size=1, kl_penalty="kl")
    three = rollout_forward(model, model, batch, chunk_size=3, kl_penalty="kl")
    for name in ("logprobs", "ref_logprobs", "values", "kls"):
        torch.testing.assert_close(getattr(one, name), getattr(three, name), rtol=0, atol=1e-5)
    assert torch.equal(one.logprobs, one.ref_logprobs)
    assert not one.kls.any()


@pytest.mark.parametrize("kl_penalty", ["kl", "abs", "mse", "full"])
def test_rollout_kl_is_the_named_penalty_against_the_reference(model, kl_penalty):
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in reference.pretrained_model.transformer.h[0].parameters():
            parameter.add_(0.05)
    batch = ResponseBatch.build(QUERIES, RESPONSES, None)
    rollout = rollout_forward(model, reference, batch, chunk_size=2, kl_penalty=kl_penalty)
    for row, (query, response) in enumerate(zip(QUERIES, RESPONSES, strict=True)):
        n = len(response)
        policy, values, _ = plain_forward(model, query, response)
        ref, _, _ = plain_forward(reference, query, response)
        if kl_penalty == "full":
            expected = KL_PENALTIES["full"](policy, ref)
        else:
            pick = response.unsqueeze(-1)
            expected = KL_PENALTIES[kl_penalty](
                policy.gather(-1, pick).squeeze(-1), ref.gather(-1, pick).squeeze(-1)
            )
        assert expected.abs().max() > 1e-4
        torch.testing.assert_close(rollout.kls[row, :n], expected, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(rollout.values[row, :n], values, rtol=0, atol=1e-5)
        assert not rollout.kls[row, n:].any()


def test_token_logprobs_match_log_softmax_with_entropy_and_gradient():
    logits = torch.randn(5, 40, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 40, (5,))
    logprobs, entropy = TokenLogprobs.apply(logits, labels)
    log_softmax = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(logprobs, log_softmax.gather(-1, labels[:, None]).squeeze(-1))
    torch.testing.assert_close(entropy, -(log_softmax.exp() * log_softmax).sum(-1))
    assert torch.autograd.gradcheck(lambda x: TokenLogprobs.apply(x, labels)[0], (logits,))
