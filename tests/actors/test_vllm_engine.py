"""The real vLLM (CPU build) engine: same outputs as transformers, weights reloaded in place."""

from __future__ import annotations

import pytest
from generator_reference import PROMPTS, always_eos_state_dict, assert_same_completions, load_model
from generator_reference import reference_greedy as reference

from rlfleet.actors.engine import SamplingSpec
from rlfleet.actors.hf_engine import HFEngine
from rlfleet.common.config import GeneratorConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    from rlfleet.actors.vllm_engine import VLLMEngine

    with pytest.MonkeyPatch.context() as env:
        env.setenv("TMPDIR", str(tmp_path_factory.mktemp("vllm-tmp")))
        yield VLLMEngine(tiny_model_dir, GeneratorConfig(kv_cache_gib=0.125), seed=0)


def test_greedy_matches_hf_engine_and_plain_forward(engine, tiny_model_dir):
    engine.load_weights(load_model(tiny_model_dir).state_dict().items())
    completions = engine.generate(PROMPTS, SamplingSpec.greedy(6))
    hf = HFEngine(tiny_model_dir, seed=0).generate(PROMPTS, SamplingSpec.greedy(6))
    assert_same_completions(completions, hf)
    assert_same_completions(completions, reference(load_model(tiny_model_dir), PROMPTS, 6))


def test_each_reload_takes_effect(engine, tiny_model_dir, other_model_dir):
    """Two syncs in a row (to new weights and back): greedy tokens and logprobs follow both."""
    for model in (load_model(other_model_dir), load_model(tiny_model_dir)):
        engine.load_weights(model.state_dict().items())
        assert_same_completions(
            engine.generate(PROMPTS, SamplingSpec.greedy(6)), reference(model, PROMPTS, 6)
        )


def test_eos_stops_like_hf_engine(engine, tiny_model_dir):
    state = always_eos_state_dict(load_model(tiny_model_dir))
    engine.load_weights(state.items())
    hf = HFEngine(tiny_model_dir, seed=0)
    hf.load_weights(state.items())
    completions = engine.generate(PROMPTS, SamplingSpec.greedy(6))
    assert_same_completions(completions, hf.generate(PROMPTS, SamplingSpec.greedy(6)))
    assert [c.finish_reason for c in completions] == ["stop"] * len(PROMPTS)


def test_sampling_shapes_and_seeded_repeat(engine, tiny_model_dir):
    engine.load_weights(load_model(tiny_model_dir).state_dict().items())
    spec = SamplingSpec(max_new_tokens=5, temperature=1.0, top_p=0.9, top_k=50, seeds=(3, 4, 5, 6))
    first = engine.generate(PROMPTS, spec)
    assert first == engine.generate(PROMPTS, spec)
    assert all(len(c.token_ids) == len(c.logprobs) == 5 for c in first)
    assert all(c.finish_reason == "length" and max(c.logprobs) < 0 for c in first)


def test_an_asleep_engine_refuses_work_until_woken_with_its_weights(engine, tiny_model_dir):
    """On CPU sleep frees nothing (vLLM's CPU build has no sleep mode), but the engine still
    refuses calls between sleep and wake_up, as it must on GPUs."""
    engine.load_weights(load_model(tiny_model_dir).state_dict().items())
    before = engine.generate(PROMPTS, SamplingSpec.greedy(4))
    engine.sleep()
    engine.sleep()
    with pytest.raises(RuntimeError, match=r"asleep: call wake_up\(\) before generate\(\)"):
        engine.generate(PROMPTS, SamplingSpec.greedy(4))
    with pytest.raises(RuntimeError, match=r"before load_weights\(\)"):
        engine.load_weights([])
    engine.wake_up()
    assert_same_completions(engine.generate(PROMPTS, SamplingSpec.greedy(4)), before)


def test_sync_drops_kv_blocks_cached_with_the_old_weights(tmp_path_factory):
    """A prompt that fills a KV block (128 tokens on CPU) is prefix-cached; after a sync, its
    cached keys and values belong to the old weights and must not be reused."""
    from rlfleet.actors.vllm_engine import VLLMEngine
    from rlfleet.tasks.tiny_model import build_tiny_model

    old, new = (
        build_tiny_model(
            tmp_path_factory.mktemp(f"long-context-{seed}"), n_positions=320, seed=seed
        )
        for seed in (0, 1)
    )
    engine = VLLMEngine(old, GeneratorConfig(kv_cache_gib=0.125), seed=0)
    prompt = [list(range(20, 280))]
    engine.generate(prompt, SamplingSpec.greedy(4))
    new_model = load_model(new)
    engine.load_weights(new_model.state_dict().items())
    assert_same_completions(
        engine.generate(prompt, SamplingSpec.greedy(4)), reference(new_model, prompt, 4)
    )
