"""rlfleet.core: the trl.core helpers TRL v0.11 scripts import."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from rlfleet import AutoModelForCausalLMWithValueHead
from rlfleet.core import LengthSampler, respond_to_batch, set_seed, top_k_top_p_filtering


def test_length_sampler_draws_every_length_in_its_half_open_range():
    sampler = LengthSampler(4, 8)
    lengths = [sampler() for _ in range(200)]
    assert set(lengths) == {4, 5, 6, 7}
    assert all(type(length) is int for length in lengths)


def test_length_sampler_follows_numpys_global_generator_as_trl():
    np.random.seed(3)
    expected = [np.random.choice(list(range(2, 9))) for _ in range(10)]
    set_seed(3)
    sampler = LengthSampler(2, 9)
    assert [sampler() for _ in range(10)] == expected


def test_set_seed_repeats_python_numpy_and_torch_draws():
    def draws():
        return random.random(), np.random.rand(), torch.rand(()).item()

    set_seed(11)
    first = draws()
    set_seed(11)
    assert draws() == first


def test_top_k_top_p_filtering_keeps_the_top_k_and_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    top_2 = top_k_top_p_filtering(logits, top_k=2)
    assert torch.isinf(top_2).tolist() == [[False, False, True, True]]
    nucleus = top_k_top_p_filtering(logits, top_p=0.75)
    assert torch.isinf(nucleus).tolist() == [[False, False, True, True]]
    assert torch.equal(top_k_top_p_filtering(logits), logits)


@pytest.mark.parametrize("wrapper", ["value_head", "causal_lm"])
def test_respond_to_batch_with_top_k_1_is_the_greedy_continuation(
    tiny_model_dir: Path, wrapper: str
):
    causal_lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = (
        AutoModelForCausalLMWithValueHead.from_pretrained(tiny_model_dir)
        if wrapper == "value_head"
        else causal_lm
    )
    queries = torch.tensor([[5, 6, 7], [8, 9, 10]])
    responses = respond_to_batch(model, queries, txt_len=6, top_k=1)
    greedy = causal_lm.generate(queries, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert responses.shape == (2, 6)
    assert torch.equal(responses, greedy[:, 3:])


def test_respond_to_batch_samples_repeatably_after_set_seed(tiny_model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    queries = torch.tensor([[5, 6, 7]])
    set_seed(0)
    first = respond_to_batch(model, queries, txt_len=8)
    set_seed(0)
    assert torch.equal(respond_to_batch(model, queries, txt_len=8), first)


def test_trl_step_helpers_say_where_rlfleet_has_that_math():
    with pytest.raises(ImportError, match=r"rlfleet\.algorithms: masked statistics"):
        from rlfleet.core import masked_whiten  # noqa: F401


def test_unknown_names_are_plain_attribute_errors():
    import rlfleet.core

    assert not hasattr(rlfleet.core, "no_such_helper")
