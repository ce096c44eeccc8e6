"""TRL-style generation: left padding, one sampled length per batch, the tokenizer's ids."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from rlfleet.trainers.trl_compat import generate, left_padded
from rlfleet.trainers.value_head import AutoModelForCausalLMWithValueHead

GREEDY = {"do_sample": False, "eos_token_id": None}


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLMWithValueHead.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_left_padded_right_aligns_each_query():
    input_ids, attention_mask = left_padded([torch.tensor([4, 5, 6]), torch.tensor([7])], 0)
    assert input_ids.tolist() == [[4, 5, 6], [0, 0, 7]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def lengths_from(*lengths: int):
    calls = iter(lengths)
    return lambda: next(calls)


def test_each_batch_gets_its_own_sampled_length(model, tokenizer):
    queries = [torch.tensor([5, 6]), torch.tensor([7]), torch.tensor([8, 9, 10])]
    (responses,) = generate([model], queries, tokenizer, lengths_from(2, 4), 2, False, dict(GREEDY))
    assert [len(r) for r in responses] == [2, 2, 4]


def test_one_query_samples_one_length_for_every_model(model, tokenizer):
    outputs = generate(
        [model, model], torch.tensor([5, 6]), tokenizer, lengths_from(3), 4, True, dict(GREEDY)
    )
    assert [tuple(o.shape) for o in outputs] == [(1, 5), (1, 5)]
    assert torch.equal(outputs[0], outputs[1])


def test_a_list_of_queries_needs_the_tokenizer(model):
    with pytest.raises(ValueError, match="generate needs the tokenizer"):
        generate([model], [torch.tensor([5])], None, None, 4, True, dict(GREEDY))
