"""The plain transformers engine against a plain forward of the same weights."""

from __future__ import annotations

import pytest
import torch
from generator_reference import PROMPTS, always_eos_state_dict, assert_same_completions, load_model
from generator_reference import reference_greedy as reference

from rlfleet.actors.engine import SamplingSpec
from rlfleet.actors.hf_engine import HFEngine, _filter_top_k, _filter_top_p


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> HFEngine:
    return HFEngine(tiny_model_dir, seed=0)


def test_greedy_matches_unbatched_forward(engine, tiny_model_dir):
    engine.load_weights(load_model(tiny_model_dir).state_dict().items())
    completions = engine.generate(PROMPTS, SamplingSpec.greedy(6))
    assert_same_completions(completions, reference(load_model(tiny_model_dir), PROMPTS, 6))
    assert all(c.finish_reason == "length" and len(c.token_ids) == 6 for c in completions)


def test_load_weights_changes_outputs_to_new_model(engine, tiny_model_dir, other_model_dir):
    other = load_model(other_model_dir)
    engine.load_weights(other.state_dict().items())
    assert_same_completions(
        engine.generate(PROMPTS, SamplingSpec.greedy(6)), reference(other, PROMPTS, 6)
    )


def test_weights_loaded_in_buckets_replace_the_model_like_one_load(
    engine, tiny_model_dir, other_model_dir
):
    other = load_model(other_model_dir)
    named = list(other.state_dict().items())
    engine.load_weights(load_model(tiny_model_dir).state_dict().items())
    for bucket in (named[: len(named) // 2], named[len(named) // 2 :]):
        engine.load_weights(bucket)
    assert_same_completions(
        engine.generate(PROMPTS, SamplingSpec.greedy(6)), reference(other, PROMPTS, 6)
    )


def test_loading_an_unknown_weight_is_named(engine):
    with pytest.raises(KeyError, match=r"no parameters named \['h.99.weight'\]"):
        engine.load_weights([("h.99.weight", torch.zeros(2))])


def test_eos_stops_with_eos_as_last_token(engine, tiny_model_dir):
    model = load_model(tiny_model_dir)
    engine.load_weights(always_eos_state_dict(model).items())
    completions = engine.generate(PROMPTS, SamplingSpec.greedy(6))
    eos = model.config.eos_token_id
    assert [c.token_ids for c in completions] == [[eos]] * len(PROMPTS)
    assert [c.finish_reason for c in completions] == ["stop"] * len(PROMPTS)
    assert all(c.logprobs[0] == pytest.approx(0.0, abs=1e-3) for c in completions)


def test_seeded_sampling_repeats_and_top_k_1_is_greedy(engine, tiny_model_dir):
    engine.load_weights(load_model(tiny_model_dir).state_dict().items())
    spec = SamplingSpec(max_new_tokens=5, temperature=1.0, seeds=(3, 4, 5, 6))
    first, again = engine.generate(PROMPTS, spec), engine.generate(PROMPTS, spec)
    assert first == again
    assert all(len(c.token_ids) == len(c.logprobs) == 5 for c in first)
    top_1 = engine.generate(PROMPTS, SamplingSpec(max_new_tokens=5, temperature=0.7, top_k=1))
    assert [c.token_ids for c in top_1] == [
        c.token_ids for c in engine.generate(PROMPTS, SamplingSpec.greedy(5))
    ]


def test_a_seeded_prompt_samples_the_same_in_any_batch(engine, tiny_model_dir):
    engine.load_weights(load_model(tiny_model_dir).state_dict().items())
    spec = SamplingSpec(max_new_tokens=5, temperature=1.0, seeds=(3, 4, 5, 6))
    together = engine.generate(PROMPTS, spec)
    alone = engine.generate(PROMPTS[2:3], SamplingSpec(max_new_tokens=5, seeds=(5,)))
    assert alone[0].token_ids == together[2].token_ids
    assert alone[0].logprobs == pytest.approx(together[2].logprobs, abs=1e-5)
    with pytest.raises(ValueError, match="2 seeds for 4 prompts"):
        engine.generate(PROMPTS, SamplingSpec(max_new_tokens=5, seeds=(1, 2)))


def test_too_long_prompt_is_rejected_by_index(engine):
    with pytest.raises(ValueError, match="prompt 1 has 126 tokens"):
        engine.generate([[5], [5] * 126], SamplingSpec.greedy(8))


def kept(filtered: torch.Tensor) -> list[bool]:
    return torch.isfinite(filtered)[0].tolist()


def test_top_k_and_top_p_keep_the_tokens_vllm_keeps():
    """Probabilities 0.5, 0.3, 0.2: top-p 0.7 keeps the first two, 0.5 only the first."""
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    assert kept(_filter_top_p(logits, 0.7)) == [True, True, False]
    assert kept(_filter_top_p(logits, 0.5)) == [True, False, False]
    assert kept(_filter_top_p(logits, 1.0)) == [True, True, True]
    assert kept(_filter_top_k(logits, 2)) == [True, True, False]
    assert kept(_filter_top_k(logits, 0)) == [True, True, True]


def test_a_bfloat16_engine_decodes_like_a_bfloat16_forward(tiny_model_dir, other_model_dir):
    """Weights loaded in float32 are cast to the engine's bfloat16. Logprob tolerance: greedy
    decoding of the same bfloat16 model with a KV cache and padding vs full forwards differs by
    up to 0.017 (measured on three tiny models, 1 and 2 threads)."""
    engine = HFEngine(tiny_model_dir, seed=0, dtype="bfloat16")
    other = load_model(other_model_dir)
    engine.load_weights(other.state_dict().items())
    assert {p.dtype for p in engine._model.parameters()} == {torch.bfloat16}
    completions = engine.generate(PROMPTS, SamplingSpec.greedy(6))
    assert_same_completions(completions, reference(other.to(torch.bfloat16), PROMPTS, 6), 0.02)


def test_sleep_and_wake_up_keep_the_engine_generating(engine, tiny_model_dir):
    engine.load_weights(load_model(tiny_model_dir).state_dict().items())
    before = engine.generate(PROMPTS, SamplingSpec.greedy(4))
    engine.sleep()
    engine.wake_up()
    assert engine.generate(PROMPTS, SamplingSpec.greedy(4)) == before
