import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from support.batches import rollout_batch
from support.prometheus_server import scrape

from rlfleet.common.config import MetricsConfig, RewardConfig
from rlfleet.common.schema import ROLLOUT_SCHEMA, with_columns
from rlfleet.reward.actor import RewardActor
from rlfleet.reward.functions import sentiment
from rlfleet.reward.scorers import RewardError, RewardTimeoutError

SENTIMENT = RewardConfig(function="rlfleet.reward.functions:sentiment", num_cpus=0.5)
EXACT_MATCH = RewardConfig(
    function="rlfleet.reward.functions:exact_match", kwargs={"extract": "last_number"}, num_cpus=0.5
)
PROMPTS = ["Say something nice:", "Say something mean:", "Say nothing:"]
RESPONSES = ["What a wonderful, lovely day!", "This is terrible, I hate it.", "The table is red."]


def test_actor_fills_score_and_keeps_the_rest():
    actor = RewardActor(0, SENTIMENT)
    batch = rollout_batch([100, 101, 102], PROMPTS, RESPONSES)
    scored = actor.score(batch)
    assert scored.schema == ROLLOUT_SCHEMA
    expected = np.array(sentiment(PROMPTS, RESPONSES), dtype=np.float32)
    assert scored.column("score").to_numpy().tolist() == expected.tolist()
    assert scored.drop_columns(["score"]).equals(batch.drop_columns(["score"]))
    served = scrape(actor.metrics_target())
    assert served["rlfleet_reward_scoring_seconds_count"] == 1
    assert served["rlfleet_reward_samples_total"] == 3
    assert served["rlfleet_reward_errors_total"] == 0
    assert served["rlfleet_reward_scoring_seconds_sum"] > 0


def test_actor_with_metrics_disabled_serves_nothing_and_still_scores():
    actor = RewardActor(0, SENTIMENT, "reward-test", MetricsConfig(enabled=False))
    assert actor.metrics_target() is None
    assert actor.score(rollout_batch([1], ["a"], ["lovely"])).column("score")[0].as_py() > 0


def test_actor_passes_metadata_fields_to_the_function():
    actor = RewardActor(0, EXACT_MATCH)
    batch = rollout_batch([1, 2], ["2+2=", "3+3="], ["4", "7"], [{"answer": 4}, {"answer": 6}])
    assert actor.score(batch).column("score").to_pylist() == [1.0, 0.0]


def test_actor_error_names_rollout_id_and_sample_text():
    actor = RewardActor(3, EXACT_MATCH)
    batch = rollout_batch(
        [15, 16, 17], ["a", "b", "c"], ["1", "2", "x" * 200], [{"answer": 1}] * 2 + [{}]
    )
    with pytest.raises(RewardError) as raised:
        actor.score(batch)
    message = str(raised.value)
    function = "rlfleet.reward.functions:exact_match"
    cause = "raised ValueError: exact_match: sample 2 has no 'answer'"
    assert f"reward actor 3 failed on rollout 17: reward function '{function}' {cause}" in message
    assert "prompt 'c', response '" + "x" * 80 + "'... (200 chars)]" in message
    assert raised.value.indices == (2,)
    assert scrape(actor.metrics_target())["rlfleet_reward_errors_total"] == 1


def test_actor_rejects_rollouts_without_response():
    actor = RewardActor(0, SENTIMENT)
    batch = rollout_batch([5, 6], ["a", "b"], ["fine", None])
    with pytest.raises(RewardError, match="failed on rollout 6: no response to score"):
        actor.score(batch)


def test_actor_rejects_metadata_that_is_not_a_json_object():
    actor = RewardActor(0, SENTIMENT)
    batch = with_columns(
        rollout_batch([8, 9], ["a", "b"], ["x", "y"]), metadata=["{}", json.dumps([1])]
    )
    with pytest.raises(
        RewardError, match="failed on rollout 9: metadata is a JSON list, not an object"
    ):
        actor.score(batch)


@pytest.mark.slow
def test_reward_actors_in_ray_score_and_report_failures(ray_local):
    ray = ray_local
    actors = [
        ray.remote(RewardActor)
        .options(num_cpus=config.num_cpus, num_gpus=config.num_gpus)
        .remote(i, config)
        for i, config in enumerate([SENTIMENT, EXACT_MATCH])
    ]
    assert ray.get([actor.ready.remote() for actor in actors]) == [True, True]

    scored = ray.get(actors[0].score.remote(rollout_batch([100, 101, 102], PROMPTS, RESPONSES)))
    expected = np.array(sentiment(PROMPTS, RESPONSES), dtype=np.float32)
    assert scored.column("score").to_numpy().tolist() == expected.tolist()

    failing = rollout_batch(
        [41, 42], ["2+2=", "3+3="], ["4", "six"], [{"answer": 4}, {"answer": "six"}]
    )
    with pytest.raises(RewardError, match="failed on rollout 42: .*'six' is not a number"):
        ray.get(actors[1].score.remote(failing))

    targets = ray.get([actor.metrics_target.remote() for actor in actors])
    assert [(t.job, t.role, t.index) for t in targets] == [("rlfleet", "reward", i) for i in (0, 1)]
    served = [scrape(target) for target in targets]
    assert served[0]["rlfleet_reward_samples_total"] == 3
    assert served[0]["rlfleet_reward_value_count"] == 3
    assert served[0]["rlfleet_reward_scoring_seconds_count"] == 1
    assert served[1]["rlfleet_reward_samples_total"] == 0
    assert served[1]["rlfleet_reward_errors_total"] == 1


@pytest.mark.slow
def test_remote_reward_actor_in_ray_counts_timeouts(ray_local, reward_server):
    ray = ray_local
    config = RewardConfig(url=f"{reward_server}/slow", timeout_s=0.2, num_cpus=0.5)
    actor = ray.remote(RewardActor).options(num_cpus=config.num_cpus).remote(0, config)
    with pytest.raises(
        RewardTimeoutError, match=r"failed on rollout 7: .*did not answer within 0.2 s"
    ):
        ray.get(actor.score.remote(rollout_batch([7], ["a"], ["b"])))
    served = scrape(ray.get(actor.metrics_target.remote()))
    assert served["rlfleet_reward_timeouts_total"] == 1
    assert served["rlfleet_reward_errors_total"] == 0
    assert served["rlfleet_reward_samples_total"] == 0


def test_actor_cuts_a_function_stuck_in_c_naming_function_timeout_and_rollouts(user_rewards):
    spec = f"{user_rewards}:catastrophic_regex"
    actor = RewardActor(0, RewardConfig(function=spec, timeout_s=1))
    started = time.monotonic()
    with pytest.raises(RewardTimeoutError) as raised:
        actor.score(rollout_batch([21, 22], ["p", "q"], ["aaa", "a" * 40 + "b"]))
    assert time.monotonic() - started < 1 + 2
    message = str(raised.value)
    assert message.startswith(
        f"reward actor 0 failed on rollouts 21, 22: reward function '{spec}' did not return "
        "within reward.timeout_s=1 s; its worker process was killed and a new one started ["
    )
    assert "\n" not in message
    assert scrape(actor.metrics_target())["rlfleet_reward_timeouts_total"] == 1
    scored = actor.score(rollout_batch([23], ["p"], ["aaa"]))
    assert scored.column("score").to_pylist() == [1.0]


def test_actor_keyboard_interrupt_is_a_reward_error_naming_the_function(user_rewards):
    spec = f"{user_rewards}:raises_keyboard_interrupt"
    actor = RewardActor(0, RewardConfig(function=spec))
    with pytest.raises(RewardError) as raised:
        actor.score(rollout_batch([31], ["p"], ["r"]))
    assert str(raised.value) == (
        f"reward actor 0 failed on rollout 31: reward function '{spec}' raised KeyboardInterrupt "
        "[rollout 31: prompt 'p', response 'r']"
    )


def test_actor_names_the_rollout_whose_score_is_not_a_finite_float(user_rewards):
    spec = f"{user_rewards}:huge_int_at_1"
    actor = RewardActor(0, RewardConfig(function=spec))
    with pytest.raises(RewardError) as raised:
        actor.score(rollout_batch([40, 41], ["p", "q"], ["a", "b"]))
    assert str(raised.value) == (
        f"reward actor 0 failed on rollout 41: reward function '{spec}' returned "
        f"{'1' + '0' * 39}... (int) for sample 1, a value that is not a finite float "
        "[rollout 41: prompt 'q', response 'b']"
    )


def test_actor_refuses_a_score_beyond_the_bound_naming_rollout_value_and_bound(user_rewards):
    spec = f"{user_rewards}:score_1e30_at_1"
    actor = RewardActor(0, RewardConfig(function=spec))
    with pytest.raises(RewardError) as raised:
        actor.score(rollout_batch([50, 51], ["p", "q"], ["a", "b"]))
    assert str(raised.value) == (
        f"reward actor 0 failed on rollout 51: reward function '{spec}' returned 1e+30 for "
        "sample 1, beyond the bound |score| <= 1e+06 (rlfleet.reward.scorers.MAX_ABS_SCORE); "
        "scale the reward down [rollout 51: prompt 'q', response 'b']"
    )
    assert scrape(actor.metrics_target())["rlfleet_reward_errors_total"] == 1


@pytest.mark.slow
def test_reward_actor_in_ray_cuts_a_stuck_function_and_reports_keyboard_interrupt(
    ray_local, user_rewards
):
    ray = ray_local
    stuck = RewardConfig(function=f"{user_rewards}:catastrophic_regex", timeout_s=2, num_cpus=0.5)
    interrupted = RewardConfig(function=f"{user_rewards}:raises_keyboard_interrupt", num_cpus=0.5)
    module_dir = next(path for path in sys.path if Path(path, f"{user_rewards}.py").exists())
    runtime_env = {"env_vars": {"PYTHONPATH": module_dir}}  # the user module, for the actors
    actors = [
        ray.remote(RewardActor)
        .options(num_cpus=config.num_cpus, runtime_env=runtime_env)
        .remote(i, config)
        for i, config in enumerate([stuck, interrupted])
    ]
    assert ray.get([actor.ready.remote() for actor in actors]) == [True, True]

    started = time.monotonic()
    with pytest.raises(
        RewardTimeoutError,
        match=r"failed on rollout 7: reward function '.*:catastrophic_regex' did not return "
        r"within reward.timeout_s=2 s",
    ):
        ray.get(actors[0].score.remote(rollout_batch([7], ["p"], ["a" * 40 + "b"])))
    assert time.monotonic() - started < 2 + 2
    scored = ray.get(actors[0].score.remote(rollout_batch([8, 9], ["p", "q"], ["aaa", "ab"])))
    assert scored.column("score").to_pylist() == [1.0, 0.0]

    with pytest.raises(
        RewardError, match=r"failed on rollout 5: reward function .* raised KeyboardInterrupt \["
    ):
        ray.get(actors[1].score.remote(rollout_batch([5], ["p"], ["r"])))
    # the actor is alive and keeps answering
    assert ray.get(actors[1].ready.remote())
    served = scrape(ray.get(actors[0].metrics_target.remote()))
    assert served["rlfleet_reward_timeouts_total"] == 1
    assert served["rlfleet_reward_samples_total"] == 2
