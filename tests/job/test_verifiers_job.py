"""verifiers environments (tests/support/vf_envs.py) trained as agent workflows end to end on real
local Ray: ``env.agent`` is envs/verifiers_agent.py's ``run``, each episode's model calls go to
the generator's endpoint (real vLLM) and the learner trains on the engine's ids. The policy is a
tiny RANDOM model with the tool chat template, so what is checked is the record of each
trajectory, not a rising reward: the rubric's reward on the turn, the first call's prompt, the
sampled ids trained and, between them, the environment's own turns (hints, tool results)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from support.job_configs import read_stats, small_job, train_recording

ENVS = "rlfleet.tests.support.vf_envs"
ROWS = 8
DROPPED = ("agent_error", "agent_timeout", "agent_no_calls")
BUDGET = 320
"""``env.max_total_tokens``: room for the guess env's six guesses and five hints (each hint is
30-45 tokens). At 200 the sixth call was refused for the budget: verifiers then fails the episode
(``ProviderError: upstream 400``), and the trajectory is trained as one at its length limit,
without the rubric's reward (actors/agent_rollout.py)."""


@pytest.fixture(autouse=True)
def vllm_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))


@pytest.fixture(scope="module")
def tool_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rlfleet.tasks.tiny_model import build_tiny_model

    # 1024 positions: the calculator's first prompt lists the tool's JSON schema
    return build_tiny_model(tmp_path_factory.mktemp("tool-model"), tools=True, n_positions=1024)


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def verifiers_job(model_dir: Path, out: Path, rows: Path, environment: str):
    return small_job(
        model_dir,
        out,
        dataset={"path": str(rows), "messages_field": "messages"},
        env={
            "agent": "rlfleet.envs.verifiers_agent:run",
            "kwargs": {"environment": f"{ENVS}:{environment}"},
            "num_actors": 1,
            "num_cpus": 0.25,
            "max_total_tokens": BUDGET,
            "max_tokens_per_turn": 8,
            "trajectory_timeout_s": 45,
        },
        generators={"max_new_tokens": 8},
        iterations=2,
    )


def train(config) -> list[dict[str, Any]]:
    """Runs the job; returns every row the learner was given."""
    from rlfleet.job.loop import TrainingJob

    job = TrainingJob(config)
    return [row for batch in train_recording(job) for row in batch.to_pylist()]


def segments(row: dict[str, Any]) -> list[tuple[list[int], list[int]]]:
    """The response as (observation ids before it, sampled ids) per call: runs of loss mask 0
    then 1."""
    found: list[tuple[list[int], list[int]]] = []
    gap: list[int] = []
    sampled: list[int] = []
    for token, mask in zip(row["response_ids"], row["loss_mask"], strict=True):
        if mask:
            sampled.append(token)
            continue
        if sampled:
            found.append((gap, sampled))
            gap, sampled = [], []
        gap.append(token)
    if sampled:
        found.append((gap, sampled))
    return found


def reply_text(tokenizer: Any, ids: list[int]) -> str:
    """An assistant message's content as the endpoint makes it (actors/endpoint.py): the ids
    less a final end-of-turn token, decoded with the special tokens."""
    stops = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
    if ids and ids[-1] in stops:
        ids = ids[:-1]
    text = tokenizer.decode(ids, skip_special_tokens=False)
    if tokenizer.eos_token and text.endswith(tokenizer.eos_token):
        text = text[: -len(tokenizer.eos_token)]
    return text


def check_common(rows: list[dict[str, Any]], out: Path) -> list[tuple[dict, dict]]:
    """What every trained row of a verifiers job holds; returns (row, env_info) pairs."""
    assert len(rows) == 2 * ROWS and len({row["rollout_id"] for row in rows}) == 2 * ROWS
    checked = []
    for row in rows:
        info = json.loads(row["env_info"])
        assert row["finish_reason"] in ("stop", "length"), info  # none dropped
        assert info["scored"] is True and info["split_calls"] == 0, info
        assert info["agent_calls"] >= 1 and sum(row["loss_mask"]) > 0
        assert info["agent_calls"] == len(segments(row)) == row["num_turns"] == info["num_turns"]
        # the turn's reward is the rubric's (one reward function of weight 1)
        (rubric,) = info["rewards"].values()
        assert sum(row["turn_rewards"]) == rubric
        assert len(row["response_ids"]) <= BUDGET
        checked.append((row, info))
    stats = read_stats(out)
    assert len(stats) == 2
    assert sum(line["env/agent_calls"] for line in stats) == sum(
        info["agent_calls"] for _, info in checked
    )
    for line in stats:
        assert not any(line.get(f"env/finished_{reason}") for reason in DROPPED), line
    return checked


@pytest.mark.slow
def test_a_verifiers_tool_env_trains_through_the_endpoint(
    ray_local, tool_model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    from rlfleet.tests.support import vf_envs

    sums = [(12 + i, 34 + i) for i in range(ROWS)]
    questions = [f"Use the calculator: what is {a} * {b}?" for a, b in sums]
    rows = write_rows(
        tmp_path / "rows.jsonl",
        [
            {"messages": [{"role": "user", "content": q}], "answer": str(a * b)}
            for q, (a, b) in zip(questions, sums, strict=True)
        ],
    )
    trained = train(verifiers_job(tool_model_dir, tmp_path / "run", rows, "load_calculator"))
    tokenizer = AutoTokenizer.from_pretrained(str(tool_model_dir))
    for row, info in check_common(trained, tmp_path / "run"):
        answer = json.loads(row["metadata"])["answer"]
        question = json.loads(row["metadata"])["messages"][0]["content"]
        # the first call's prompt: the tool's schema in a system turn, then the question
        prompt = tokenizer.decode(row["prompt_ids"], skip_special_tokens=False)
        head, _, rest = prompt.partition("<tools>\n")
        assert head == "<|im_start|>system\n# Tools\n", prompt
        schemas, _, _ = rest.partition("\n</tools>")
        tools = [json.loads(line) for line in schemas.splitlines()]
        assert [tool["function"]["name"] for tool in tools] == [vf_envs.TOOL_NAME]
        assert "expression" in tools[0]["function"]["parameters"]["properties"]
        first = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}],
            tools=tools,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        assert row["prompt_ids"] == list(first)
        calls = segments(row)
        # tool results, as the template renders them, between the calls
        for gap, _ in calls[1:]:
            assert "<tool_response>" in tokenizer.decode(gap, skip_special_tokens=False)
        assert info["metrics"]["tool_results"] >= len(calls) - 1
        assert info["stop_condition"] in ("agent_completed", "max_turns"), info
        last = reply_text(tokenizer, calls[-1][1]).strip()
        assert info["rewards"]["exact_match"] == float(last == answer)


@pytest.mark.slow
def test_a_verifiers_multi_turn_env_trains_its_hints_as_observations(
    ray_local, tool_model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    from rlfleet.tests.support import vf_envs

    secrets = [7 + 11 * i for i in range(ROWS)]
    rows = write_rows(
        tmp_path / "rows.jsonl",
        [
            {"messages": [{"role": "user", "content": vf_envs.SECRET_INSTRUCTIONS}], "secret": s}
            for s in secrets
        ],
    )
    trained = train(verifiers_job(tool_model_dir, tmp_path / "run", rows, "load_guess"))
    tokenizer = AutoTokenizer.from_pretrained(str(tool_model_dir))
    first = tokenizer.apply_chat_template(
        [{"role": "user", "content": vf_envs.SECRET_INSTRUCTIONS}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    several = 0
    for row, info in check_common(trained, tmp_path / "run"):
        secret = json.loads(row["metadata"])["secret"]
        assert row["prompt_ids"] == list(first)
        calls = segments(row)
        guesses = [vf_envs.first_number(reply_text(tokenizer, ids)) for _, ids in calls]
        assert info["metrics"]["guesses"] == len(calls)
        assert info["rewards"]["found"] == float(secret in guesses)
        # each wrong guess's hint is the next user turn: observation ids, not trained
        for (gap, _), guess in zip(calls[1:], guesses, strict=False):
            text = tokenizer.decode(gap, skip_special_tokens=False)
            assert f"<|im_start|>user\n{vf_envs.hint(guess, secret)}<|im_end|>" in text, text
        if len(calls) > 1:
            several += 1
            assert 0 in row["loss_mask"]
        assert len(calls) <= 6  # the player's max_turns
        if len(calls) == 6 and secret not in guesses:
            assert info["stop_condition"] == "max_turns", info
    assert several > 0, "no episode went past its first guess"
