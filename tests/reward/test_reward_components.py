"""A reward of named, weighted components (``reward.components``): the weighted sum as the
score, each component's raw scores in ``score_components`` and in the reward metrics, and errors
that name the component and the sample."""

import pytest
from conftest import served_scores
from support.batches import rollout_batch

from rlfleet.common.config import MetricsConfig, RewardConfig
from rlfleet.common.schema import ROLLOUT_SCHEMA
from rlfleet.reward.actor import RewardActor
from rlfleet.reward.functions import arithmetic_correct, length_penalty
from rlfleet.reward.metrics import RewardMetrics
from rlfleet.reward.scorers import (
    ComponentsScorer,
    FunctionScorer,
    RewardError,
    RewardTimeoutError,
    make_scorer,
)

PROMPTS = ["2+3=", "4*5=", "9-7="]
RESPONSES = ["5", "a long answer: 21", "2, what a lovely sum"]
METADATA = [{"answer": 5}, {"answer": 20}, {"answer": 2}]
CORRECT_AND_SHORT = RewardConfig(
    components=[
        {"name": "correct", "function": "rlfleet.reward.functions:arithmetic_correct"},
        {
            "name": "short",
            "function": "rlfleet.reward.functions:length_penalty",
            "weight": 0.1,
            "kwargs": {"target": 0, "coef": 0.01},
        },
    ],
    num_cpus=0.5,
)


def expected_parts() -> dict[str, list[float]]:
    answers = [row["answer"] for row in METADATA]
    return {
        "correct": arithmetic_correct(PROMPTS, RESPONSES, answer=answers),
        "short": length_penalty(PROMPTS, RESPONSES, target=0, coef=0.01, answer=answers),
    }


def test_the_score_is_the_weighted_sum_of_the_components_raw_scores():
    scorer = make_scorer(CORRECT_AND_SHORT)
    assert isinstance(scorer, ComponentsScorer)
    scores, parts = scorer.score_parts(PROMPTS, RESPONSES, METADATA)
    expected = expected_parts()
    assert parts == expected
    assert parts["correct"] == [1.0, 0.0, 1.0]
    weighted = [c + 0.1 * s for c, s in zip(expected["correct"], expected["short"], strict=True)]
    assert scores == pytest.approx(weighted, abs=1e-12)
    assert scorer.score(PROMPTS, RESPONSES, METADATA) == scores


def test_a_single_source_has_no_components():
    scorer = make_scorer(RewardConfig(function="rlfleet.reward.functions:arithmetic_correct"))
    assert scorer.score_parts(PROMPTS, RESPONSES, METADATA) == ([1.0, 0.0, 1.0], {})


def test_components_may_be_urls(reward_server):
    config = RewardConfig(
        components=[
            {"name": "served", "url": f"{reward_server}/score", "weight": -2.0},
            {"name": "correct", "function": "rlfleet.reward.functions:arithmetic_correct"},
        ]
    )
    scores, parts = make_scorer(config).score_parts(PROMPTS, RESPONSES, METADATA)
    served = served_scores({"prompts": PROMPTS, "responses": RESPONSES, "metadata": METADATA})
    assert parts == {"served": served, "correct": [1.0, 0.0, 1.0]}
    assert scores == [-2.0 * s + c for s, c in zip(served, parts["correct"], strict=True)]


def test_a_component_error_names_the_component_and_the_sample(user_rewards):
    config = RewardConfig(
        components=[
            {"name": "fine", "function": f"{user_rewards}:numpy_lengths"},
            {"name": "picky", "function": f"{user_rewards}:fail_on_bad"},
        ]
    )
    scorer = make_scorer(config)
    with pytest.raises(RewardError, match="reward component 'picky': .*cannot score bad") as raised:
        scorer.score_parts(["", "", ""], ["ok", "bad", "ok"], [{}, {}, {}])
    assert raised.value.indices == (1,)


def test_a_component_that_hangs_is_cut_off_at_the_timeout_and_named(user_rewards):
    config = RewardConfig(
        components=[{"name": "stuck", "function": f"{user_rewards}:hangs"}], timeout_s=0.2
    )
    with pytest.raises(RewardTimeoutError, match="reward component 'stuck': .*timeout_s=0.2"):
        make_scorer(config).score(["a"], ["b"], [{}])


def test_a_component_that_breaks_its_inputs_is_named(user_rewards):
    scorer = ComponentsScorer([("x", 1.0, FunctionScorer(f"{user_rewards}:numpy_lengths"))])
    with pytest.raises(RewardError, match="reward component 'x': .*differ in length"):
        scorer.score_parts(["a"], ["b", "c"], [{}])


def test_an_overflowing_weighted_sum_is_an_error(user_rewards):
    scorer = ComponentsScorer([("big", 1e308, FunctionScorer(f"{user_rewards}:numpy_lengths"))])
    with pytest.raises(RewardError, match="reward components 'big' returned inf for sample 0"):
        scorer.score(["a"], ["bb"], [{}])


def generated(prompts=PROMPTS, responses=RESPONSES, metadata=METADATA):
    """Rollouts ``0..`` waiting for their score: prompt token ids ``[1]``, response ``[2]``."""
    n = len(prompts)
    return rollout_batch(
        range(n), prompts, responses, metadata, prompt_ids=[[1]] * n, response_ids=[[2]] * n
    )


def test_the_actor_fills_score_components_and_the_metrics_per_component():
    actor = RewardActor(0, CORRECT_AND_SHORT, "demo", MetricsConfig(enabled=False))
    scored = actor.score(generated())
    assert scored.schema == ROLLOUT_SCHEMA
    rows = [dict(row) for row in scored.column("score_components").to_pylist()]
    expected = expected_parts()
    for index, row in enumerate(rows):
        assert set(row) == {"correct", "short"}
        for name in row:
            assert row[name] == pytest.approx(expected[name][index], rel=1e-6)  # float32
    metrics = actor._metrics
    for name in ("correct", "short"):
        labels = {**metrics.labels, "component": name}
        count = metrics.registry.get_sample_value("rlfleet_reward_component_value_count", labels)
        assert count == 3
    correct = {**metrics.labels, "component": "correct", "le": "0.0"}
    assert metrics.registry.get_sample_value("rlfleet_reward_component_value_bucket", correct) == 1


def test_a_single_source_actor_leaves_score_components_null():
    config = RewardConfig(function="rlfleet.reward.functions:arithmetic_correct")
    scored = RewardActor(0, config, "demo", MetricsConfig(enabled=False)).score(generated())
    assert scored.column("score_components").null_count == 3


def test_the_actor_error_names_the_component_and_the_rollout(user_rewards):
    config = RewardConfig(components=[{"name": "picky", "function": f"{user_rewards}:fail_on_bad"}])
    actor = RewardActor(0, config, "demo", MetricsConfig(enabled=False))
    with pytest.raises(RewardError, match=r"rollout 1: reward component 'picky'.*'bad'"):
        actor.score(generated(["p", "q"], ["ok", "bad"], [{}, {}]))


def test_component_metrics_record_each_named_component():
    metrics = RewardMetrics("demo", 0)
    metrics.record_component_scores({"a": [1.0, -1.0], "b": [0.25]})
    labels = metrics.labels
    value = metrics.registry.get_sample_value
    assert value("rlfleet_reward_component_value_count", {**labels, "component": "a"}) == 2
    assert value("rlfleet_reward_component_value_count", {**labels, "component": "b"}) == 1
    bucket = {**labels, "component": "a", "le": "0.0"}
    assert value("rlfleet_reward_component_value_bucket", bucket) == 1
