"""``skyrl_gym`` text environments run unchanged (envs/skyrl_gym.py): built from the row as
SkyRL's generator builds them, their step outputs as ``Step``s, loaded by ``env.environment``
alone; and (slow) a job trains on one's trajectories."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig  # skyrl_gym's dependency (the agents extra)
from support import skyrl_envs
from support.job_configs import REPO, read_stats, small_job, train_recording
from support.skyrl_envs import NO_NUMBER, GuessTextEnv, intro

from rlfleet.common.env_config import EnvConfig
from rlfleet.envs.actor import EnvActor
from rlfleet.envs.loading import EnvConfigError, check_environment, load_environment_factory
from rlfleet.envs.protocol import Step
from rlfleet.envs.skyrl_gym import SkyRLGymEnvironment, json_values

GUESS = "support.skyrl_envs:GuessTextEnv"
SYSTEM = {"role": "system", "content": "Answer with a number."}
"""What ``GuessTextEnv.init`` puts before the row's prompt."""


def skyrl_row(secret: int, **fields: Any) -> dict[str, Any]:
    """A row as a generator gives it to an environment: SkyRL's dataset columns (``prompt``
    rendered to text, its conversation as ``messages``) and the rest as they are."""
    return {
        "prompt": "<the rendered conversation>",
        "messages": intro(),
        "env_class": "guess",
        "reward_spec": {"method": "rule", "ground_truth": secret},
        "extra_info": {"index": 7},
        **fields,
    }


def guess_env(**fields: Any) -> SkyRLGymEnvironment:
    environment = load_environment_factory(EnvConfig(environment=GUESS, **fields))()
    assert isinstance(environment, SkyRLGymEnvironment)
    return environment


def test_the_loader_wraps_a_text_env_and_checks_it_without_a_row() -> None:
    config = EnvConfig(environment=GUESS, kwargs={"win_reward": 2.0}, max_turns=3)
    assert check_environment(config) is None
    factory = load_environment_factory(config)
    assert factory.cls is SkyRLGymEnvironment
    assert factory.kwargs == {
        "env_class": GuessTextEnv,
        "env_config": {"win_reward": 2.0},
        "max_turns": 3,
    }
    assert factory() is not factory()


def test_reset_builds_the_env_from_the_row_as_skyrl_does() -> None:
    environment = guess_env(kwargs={"win_reward": 2.0}, max_turns=3)
    row = skyrl_row(5)
    first = environment.reset(row, seed=11)
    assert first == [SYSTEM, *intro()]  # what init returned
    env = environment.env
    assert isinstance(env, GuessTextEnv)
    assert isinstance(env.env_config, DictConfig) and env.env_config.win_reward == 2.0
    assert env.extras == {  # the row less its prompt and env_class, plus the turn limit
        "reward_spec": {"method": "rule", "ground_truth": 5},
        "extra_info": {"index": 7},
        "max_turns": 3,
    }
    assert row == skyrl_row(5)  # init and the env got copies


def test_steps_map_observations_reward_done_and_metadata() -> None:
    environment = guess_env(kwargs={"win_reward": 2.0, "miss_reward": -0.5}, max_turns=4)
    environment.reset(skyrl_row(5), seed=0)
    assert environment.step("3") == Step(
        observation=[{"role": "user", "content": "higher"}],
        reward=-0.5,
        done=False,
        info={"hints": ["higher"], "rewards": [-0.5]},  # the env object itself is no JSON
    )
    assert environment.step("pass").observation == [{"role": "user", "content": NO_NUMBER}]
    won = environment.step("it is 5")
    assert won == Step(
        observation=None,  # [] in SkyRL: nothing to append
        reward=2.0,
        done=True,
        info={
            "hints": ["higher", NO_NUMBER],
            "rewards": [-0.5, -0.5, 2.0],
            "turns": 3,  # get_metrics(), once done
            "solved": True,
        },
    )


def test_the_env_ends_at_env_max_turns_through_its_extras() -> None:
    environment = guess_env(max_turns=2)
    environment.reset(skyrl_row(9), seed=0)
    assert not environment.step("12").done
    last = environment.step("12")
    assert last.done and last.observation is None and last.reward == 0.0
    assert last.info["solved"] is False and last.info["turns"] == 2


def test_close_is_forwarded_and_a_second_reset_closes_the_first_env() -> None:
    environment = guess_env()
    environment.reset(skyrl_row(3), seed=0)
    environment.reset(skyrl_row(4), seed=0)
    assert skyrl_envs.CLOSED[-1:] == [3]
    environment.close()
    environment.close()  # once only
    assert skyrl_envs.CLOSED[-2:] == [3, 4]


def test_a_builtin_skyrl_gym_env_runs_unchanged() -> None:
    """skyrl_gym's own multi-turn GSM8k: ground truth from ``reward_spec``, its turn limit from
    the extras' ``max_turns``, turn-level format rewards."""
    config = EnvConfig(
        environment="skyrl_gym.envs.gsm8k.multi_turn_env:GSM8kMultiTurnEnv", max_turns=3
    )
    environment = load_environment_factory(config)()
    row = {
        "prompt": "...",
        "messages": [{"role": "user", "content": "What is 6 * 7?"}],
        "data_source": "openai/gsm8k",
        "reward_spec": {"method": "rule", "ground_truth": "42"},
        "extra_info": {"split": "train"},
    }
    assert environment.reset(row, seed=0) == row["messages"]
    wrong = environment.step("#### 41")
    assert not wrong.done and wrong.reward == pytest.approx(0.2 / 3)
    assert wrong.observation[0]["role"] == "user" and "####" in wrong.observation[0]["content"]
    right = environment.step("#### 42")
    assert right.done and right.reward == 1.0 and right.info == {"steps": 2}


def test_the_environment_actor_runs_it() -> None:
    """The actor's own path (the loader's factory, threads, Step checks, close), without Ray."""
    actor = EnvActor(0, EnvConfig(environment=GUESS, kwargs={"miss_reward": -1.0}, max_turns=3))

    async def play() -> list[Any]:
        reset = await actor.reset(1, skyrl_row(2), seed=5)
        first = await actor.step(1, 1, "9")
        second = await actor.step(1, 2, "2")
        return [reset, first, second, actor.live_trajectories()]

    reset, first, second, live = asyncio.run(play())
    assert reset.error is None and reset.observation == [SYSTEM, *intro()]
    assert first.error is None and first.observation == [{"role": "user", "content": "lower"}]
    assert first.reward == -1.0 and not first.done
    assert second.done and second.reward == 1.0 and live == 0
    assert skyrl_envs.CLOSED[-1] == 2


def test_a_text_env_without_step_is_refused_in_one_line() -> None:
    with pytest.raises(EnvConfigError) as raised:
        check_environment(EnvConfig(environment="support.skyrl_envs:NoStepTextEnv"))
    assert str(raised.value) == (
        "env.environment: support.skyrl_envs:NoStepTextEnv is a skyrl_gym BaseTextEnv without "
        "its own step(action) method"
    )


def test_a_row_without_a_conversation_is_refused() -> None:
    row = skyrl_row(3)
    del row["messages"]
    with pytest.raises(ValueError, match=r"set dataset\.messages_field"):
        guess_env().reset(row, seed=0)


def test_info_keeps_json_values_and_counters_in_their_shape() -> None:
    values = {
        "sql": ("db", "select 1", 2),
        "tool_calls": 3,  # rlfleet sums {tool: count} under this key
        "tool_errors": {"sql": 1},
        "malformed_tool_calls": 1,
        "handle": object(),
    }
    assert json_values(values) == {
        "sql": ("db", "select 1", 2),
        "tool_errors": {"sql": 1},
        "malformed_tool_calls": 1,
    }


def test_rlfleet_loads_environments_without_skyrl_gym() -> None:
    code = (
        "import sys; sys.modules['skyrl_gym'] = None\n"  # an import of it fails, as uninstalled
        "from rlfleet.common.env_config import EnvConfig\n"
        "from rlfleet.envs.loading import load_environment_factory\n"
        "env = load_environment_factory(EnvConfig(environment='rlfleet.tasks.guess:GuessEnv'))()\n"
        "assert env.reset({}, 1)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


# -- a job --------------------------------------------------------------------------------------

WIN, MISS = 1.0, -0.25


@pytest.fixture
def vllm_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))


def observation_runs(row: dict[str, Any]) -> list[list[int]]:
    """The ids of each stretch of loss mask 0 (the observations) of a trajectory record."""
    runs: list[list[int]] = []
    previous = 1
    for token, mask in zip(row["response_ids"], row["loss_mask"], strict=True):
        if mask == 0:
            if previous == 1:
                runs.append([])
            runs[-1].append(token)
        previous = mask
    return runs


@pytest.mark.slow
def test_a_job_trains_on_a_skyrl_gym_env(ray_local, vllm_tmpdir, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from rlfleet.job.loop import TrainingJob
    from rlfleet.tasks.tiny_model import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "model", chat_template=True, n_positions=256)
    prompts = tmp_path / "skyrl_prompts.jsonl"
    rows = [{k: v for k, v in skyrl_row(s).items() if k != "messages"} for s in range(1, 5)]
    prompts.write_text("".join(json.dumps({**row, "prompt": intro()}) + "\n" for row in rows))
    config = small_job(
        model_dir,
        tmp_path / "run",
        iterations=2,
        dataset={"path": str(prompts), "messages_field": "prompt", "shuffle": False},
        env={
            "environment": GUESS,
            "kwargs": {"win_reward": WIN, "miss_reward": MISS},
            "num_actors": 1,
            "num_cpus": 0.25,
            "max_turns": 3,
            "max_total_tokens": 128,
        },
        generators={"max_new_tokens": 8},
        reward={"function": "rlfleet.reward.functions:environment_only"},
        logging={"samples_per_iteration": 8},
    )
    job = TrainingJob(config)
    trained = train_recording(job)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = [row for batch in trained for row in batch.to_pylist()]
    assert len(records) == 16
    hints_seen = 0
    for row in records:
        info = json.loads(row["env_info"])
        assert "error" not in info, info["error"]
        assert row["finish_reason"] in ("stop", "length")  # the env ends at max_turns itself
        assert "Answer with a number." in row["prompt"]  # init's prompt was sampled from
        assert row["turn_rewards"] == info["rewards"]  # what the env gave, turn by turn
        assert set(row["turn_rewards"]) <= {WIN, MISS}
        assert row["num_turns"] == len(row["turn_rewards"]) >= 1
        assert all(row["loss_mask"][end] == 1 for end in row["turn_ends"])
        runs = [tokenizer.decode(run) for run in observation_runs(row)]
        if row["finish_reason"] == "stop":  # every hint appended whole
            assert len(runs) == len(info["hints"]) == row["num_turns"] - 1
            assert info["turns"] == row["num_turns"] and "solved" in info  # get_metrics()
            assert row["num_turns"] == 3 or info["solved"]
        else:  # out of tokens: the last observation may be cut
            runs = runs[: len(info["hints"]) - 1]
        for text, hint in zip(runs, info["hints"], strict=False):
            assert f"user\n{hint}<|im_end|>" in text  # as the chat template wrote it, mask 0
            assert hint in row["response"]
            hints_seen += 1
    assert hints_seen > 0
    assert len(read_stats(tmp_path / "run")) == 2  # both iterations ran
