"""Generator actors in a real local Ray: Arrow batches in and out, weight syncs that take effect."""

from __future__ import annotations

import pytest
from generator_reference import PROMPTS, assert_same_completions, load_model
from generator_reference import reference_greedy as reference
from support.probes import generator_greedy, generator_version
from support.prometheus_server import scrape

from rlfleet.actors.generator import RemoteGenerator, generator_options
from rlfleet.common.config import GeneratorConfig
from rlfleet.common.schema import ROLLOUT_SCHEMA, prompt_batch
from rlfleet.common.transport import make_publisher

pytestmark = pytest.mark.slow

TEXTS = ["the movie was", "i did not like", "great"]


@pytest.fixture(scope="module", params=["vllm", "hf"])
def generator(request, ray_local, tiny_model_dir):
    config = GeneratorConfig(engine=request.param, max_new_tokens=5, kv_cache_gib=0.125)
    actor = RemoteGenerator.options(**generator_options(config)).remote(
        2, str(tiny_model_dir), config, 0
    )
    assert ray_local.get(actor.ready.remote())
    yield actor
    ray_local.kill(actor)


def test_generate_fills_rollout_columns_of_the_batch(ray_local, generator, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    batch = prompt_batch(
        [10, 11, 12], TEXTS, tokenizer(TEXTS).input_ids, metadata=[{"answer": 1}, {}, {}]
    )
    out = ray_local.get(generator.generate.remote(batch))
    assert out.schema == ROLLOUT_SCHEMA
    for kept in ("rollout_id", "prompt", "prompt_ids", "metadata", "score"):
        assert out.column(kept).equals(batch.column(kept)), kept
    rows = out.to_pylist()
    for row in rows:
        ids = row["response_ids"]
        assert 1 <= len(ids) == len(row["response_logprobs"]) <= 5
        ended_by_eos = ids[-1] == tokenizer.eos_token_id
        assert row["finish_reason"] == ("stop" if ended_by_eos else "length")
        assert row["response"] == tokenizer.decode(ids, skip_special_tokens=True)
        assert all(logprob <= 0 for logprob in row["response_logprobs"])
    assert [row["policy_version"] for row in rows] == [0, 0, 0]


def test_each_weight_sync_takes_effect_and_advances_the_version(
    ray_local, generator, tiny_model_dir, other_model_dir
):
    publisher = make_publisher()
    for version, model_dir in ((1, other_model_dir), (2, tiny_model_dir)):
        model = load_model(model_dir)
        handle = publisher.publish(model.state_dict(), version)
        assert ray_local.get(generator.load_weights.remote(handle)) == version
        assert generator_version(generator) == version
        greedy = generator_greedy(generator, PROMPTS, 6)
        assert_same_completions(greedy, reference(model, PROMPTS, 6))


def test_metrics_endpoint_counts_rollouts_tokens_and_weight_loads(
    ray_local, generator, tiny_model_dir
):
    target = ray_local.get(generator.metrics_target.remote())
    assert (target.job, target.role, target.index) == ("rlfleet", "generator", 2)
    before = scrape(target)
    out = ray_local.get(generator.generate.remote(prompt_batch([30, 31], TEXTS[:2], PROMPTS[:2])))
    version = generator_version(generator) + 1
    handle = make_publisher().publish(load_model(tiny_model_dir).state_dict(), version)
    assert ray_local.get(generator.load_weights.remote(handle)) == version
    after = scrape(target)

    def grew(name: str) -> float:
        return after[name] - before[name]

    tokens = sum(len(ids) for ids in out.column("response_ids").to_pylist())
    assert grew("rlfleet_generator_rollouts_total") == 2
    assert grew("rlfleet_generator_tokens_total") == tokens
    assert grew("rlfleet_generator_generation_seconds_count") == 1
    assert grew("rlfleet_generator_weight_load_seconds_count") == 1
    assert after["rlfleet_generator_policy_version"] == version
    assert after["rlfleet_generator_busy"] == 0
