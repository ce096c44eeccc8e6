"""The multi-turn rollout loop against real environment actors in a local Ray, with a real vLLM
engine: trajectories token for token, turn budgets, timeouts, errors and a killed env actor."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import ray
from support.envs import observation

from rlfleet.actors.engine import SamplingSpec
from rlfleet.actors.generator import rollout_seed
from rlfleet.actors.rollout import EnvFailed, MultiTurnRollout, Trajectory, turn_seed
from rlfleet.actors.turns import TurnTokens
from rlfleet.common.env_config import EnvConfig
from rlfleet.envs.actor import EnvActor, env_actor_options

pytestmark = pytest.mark.slow

TESTS = str(Path(__file__).resolve().parents[1])


class RecordingEngine:
    """A real engine's request API, recording every completion it returned."""

    def __init__(self, engine) -> None:
        self.engine, self.completions, self.prompts = engine, {}, {}

    def submit(self, key, prompt_ids, params):
        self.prompts[key] = (list(prompt_ids), params)
        self.engine.submit(key, prompt_ids, params)

    def poll(self):
        finished = self.engine.poll()
        self.completions.update(finished)
        return finished

    def busy(self):
        return self.engine.busy()

    @property
    def context(self):
        return self.engine.context


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from rlfleet.actors.vllm_engine import VLLMEngine
    from rlfleet.common.config import GeneratorConfig

    return VLLMEngine(tiny_model_dir, GeneratorConfig(max_new_tokens=6, kv_cache_gib=0.125), 0)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


STARTED: list = []
"""The environment actors a test started (killed after it: the Ray instance is the session's)."""


@pytest.fixture(autouse=True)
def kill_env_actors():
    yield
    while STARTED:
        ray.kill(STARTED.pop(), no_restart=True)


def start_envs(ray_local, config: EnvConfig, n: int = 2):
    options = {**env_actor_options(config), "num_cpus": 0}  # the session's CPUs stay free
    remote = ray.remote(EnvActor).options(
        **options, runtime_env={"env_vars": {"PYTHONPATH": TESTS}}
    )
    actors = [remote.remote(i, config) for i in range(n)]
    STARTED.extend(actors)
    ray.get([a.ready.remote() for a in actors])
    return actors


def run(engine, tokenizer, envs, config, rows, seed=0):
    recorder = RecordingEngine(engine)
    loop = MultiTurnRollout(
        recorder, TurnTokens(tokenizer), envs, config, SamplingSpec(max_new_tokens=6), 512
    )
    prompt = tokenizer("the movie was").input_ids
    trajectories = [
        Trajectory(rid, rollout_seed(seed, rid), row, prompt) for rid, row in enumerate(rows)
    ]
    return loop.run(trajectories), recorder


def segments(mask):
    """(start, end, value) runs of equal mask values."""
    runs, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            runs.append((start, i, mask[start]))
            start = i
    return runs


def test_every_token_is_the_engines_or_the_environments(ray_local, engine, tokenizer):
    config = EnvConfig(environment="support.envs:CountingEnv", max_turns=5, max_total_tokens=200)
    envs = start_envs(ray_local, config)
    rows = [{"turns": 1 + i % 4} for i in range(8)]
    trajectories, recorder = run(engine, tokenizer, envs, config, rows)
    for t in trajectories:
        assert t.finish_reason == "stop" and t.turns == t.row["turns"]
        assert t.turn_rewards == [0.25] * t.turns
        sampled = [recorder.completions[f"{t.rollout_id}:0:{k}:0"] for k in range(t.turns)]
        expected_ids, expected_mask, expected_logprobs = [], [], []
        for k, completion in enumerate(sampled):
            expected_ids += completion.token_ids
            expected_mask += [1] * len(completion.token_ids)
            expected_logprobs += completion.logprobs
            if k + 1 < t.turns:
                obs = tokenizer.encode(observation(k + 1), add_special_tokens=False)
                expected_ids += obs
                expected_mask += [0] * len(obs)
                expected_logprobs += [0.0] * len(obs)
        assert t.response_ids == expected_ids
        assert t.loss_mask == expected_mask
        assert t.logprobs == expected_logprobs
        ends = [end - 1 for start, end, value in segments(t.loss_mask) if value == 1]
        assert t.turn_ends == ends
        for k in range(t.turns):  # each turn was sampled from everything before it, seeded
            prompt, params = recorder.prompts[f"{t.rollout_id}:0:{k}:0"]
            before = t.turn_ends[k - 1] + 1 + len(tokenizer.encode(observation(k))) if k else 0
            assert prompt == t.prompt_ids + t.response_ids[:before]
            assert params.seeds == (turn_seed(t.seed, k),)


def test_the_token_budget_and_max_turns_end_trajectories(ray_local, engine, tokenizer):
    config = EnvConfig(environment="support.envs:CountingEnv", max_turns=2, max_total_tokens=15)
    envs = start_envs(ray_local, config, n=1)
    trajectories, _ = run(engine, tokenizer, envs, config, [{"turns": 9}] * 6)
    for t in trajectories:
        assert len(t.response_ids) <= 15
        assert t.finish_reason in ("max_turns", "length")
        assert t.turns <= 2
    assert {t.finish_reason for t in trajectories} >= {"max_turns"} or any(
        len(t.response_ids) == 15 for t in trajectories
    )


def test_an_observation_past_the_budget_is_cut_and_counted(ray_local, engine, tokenizer):
    config = EnvConfig(environment="support.envs:CountingEnv", max_total_tokens=30)
    envs = start_envs(ray_local, config, n=1)
    trajectories, _ = run(engine, tokenizer, envs, config, [{"turns": 3, "repeat": 20}] * 3)
    for t in trajectories:
        assert t.finish_reason == "length" and t.turns == 1
        assert len(t.response_ids) == 30 and t.counters["truncated_observations"] == 1
        assert t.loss_mask[t.turn_ends[0] + 1 :] == [0] * (29 - t.turn_ends[0])


def test_a_hung_step_ends_its_trajectory_only(ray_local, engine, tokenizer):
    config = EnvConfig(environment="support.envs:CountingEnv", step_timeout_s=1.0)
    envs = start_envs(ray_local, config)
    rows = [{"turns": 3}, {"turns": 3, "hang_at": 2}, {"turns": 2}, {"turns": 3}]
    started = time.monotonic()
    trajectories, _ = run(engine, tokenizer, envs, config, rows)
    assert time.monotonic() - started < 10
    assert [t.finish_reason for t in trajectories] == ["stop", "env_timeout", "stop", "stop"]
    assert trajectories[1].turns == 2


def test_a_raising_env_ends_its_trajectory_or_the_shard(ray_local, engine, tokenizer):
    config = EnvConfig(environment="support.envs:CountingEnv")
    envs = start_envs(ray_local, config)
    rows = [{"turns": 3, "raise_at": 2}, {"turns": 2}, {"turns": 2, "raise_at": 0}]
    trajectories, _ = run(engine, tokenizer, envs, config, rows)
    assert [t.finish_reason for t in trajectories] == ["env_error", "stop", "env_error"]
    error = trajectories[0].info["error"]
    assert "support.envs:CountingEnv" in error and "trajectory 0" in error
    assert "turn 2" in error and "broken at turn 2" in error
    assert trajectories[2].turns == 1  # reset failed: one turn from the dataset's prompt
    fail = config.model_copy(update={"on_error": "fail"})
    with pytest.raises(EnvFailed, match="trajectory 0 at turn 2"):
        run(engine, tokenizer, start_envs(ray_local, fail), fail, rows[:1])


def test_async_environments_step_concurrently(ray_local, engine, tokenizer):
    config = EnvConfig(
        environment="support.envs:AsyncCountingEnv", kwargs={"sleep_s": 0.5}, max_turns=3
    )
    envs = start_envs(ray_local, config, n=1)
    started = time.monotonic()
    trajectories, _ = run(engine, tokenizer, envs, config, [{"turns": 2}] * 16)
    assert all(t.finish_reason == "stop" for t in trajectories)
    assert time.monotonic() - started < 16 * 2 * 0.5 / 4  # far from one step at a time


def test_a_killed_env_actor_restarts_its_trajectories_from_turn_0(ray_local, engine, tokenizer):
    config = EnvConfig(environment="support.envs:CountingEnv", kwargs={"sleep_s": 0.3})
    envs = start_envs(ray_local, config)
    rows = [{"turns": 3}] * 6
    reference, _ = run(engine, tokenizer, envs, config, rows)
    pid = ray.get(envs[1].pid.remote())
    import threading

    threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
    trajectories, _ = run(engine, tokenizer, envs, config, rows)
    restarted = [t for t in trajectories if t.restarts]
    assert restarted and all(t.rollout_id % 2 == 1 for t in restarted)
    for t, ref in zip(trajectories, reference, strict=True):
        assert t.finish_reason == "stop"
        assert t.response_ids == ref.response_ids  # the same seeds, the same samples


def test_seeded_prompts_past_one_steps_token_budget_are_sampled(engine):
    """vLLM's CPU build cannot rewind a seeded request's generator after a chunked prefill; 64
    seeded prompts of 100 tokens (past the 4096 tokens of one engine step) failed with "CPU
    Generator does not use offset" until the engine prefilled whole prompts."""
    prompts = [[(7 * i + j) % 600 + 1 for j in range(100)] for i in range(64)]
    params = SamplingSpec(max_new_tokens=4, seeds=tuple(range(64)))
    completions = engine.generate(prompts, params)
    assert len(completions) == 64 and all(c.token_ids for c in completions)
