"""envs/verifiers_agent.py: verifiers environments (tests/support/vf_envs.py) played through a
real ``openai.AsyncOpenAI`` client against ``ScriptedChatServer``, a TEST DOUBLE of the policy's
endpoint (actors/endpoint.py): fastapi on uvicorn in a thread, answering each chat completion
with the next scripted message and recording every request it gets."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import openai
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from rlfleet.envs import verifiers_agent
from rlfleet.envs.verifiers_agent import (
    KEY_VARIABLE_PREFIX,
    VerifiersEnvironmentError,
    VerifiersRolloutError,
    run,
)
from rlfleet.tests.support import vf_envs
from rlfleet.tests.support.ports import free_ports

ENVS = "rlfleet.tests.support.vf_envs"
SESSION = "s1"
KEY = "session-key-1"


class ScriptedChatServer:
    """TEST DOUBLE of the policy's OpenAI-compatible endpoint (the real one is
    actors/endpoint.py): ``/sessions/<id>/v1/chat/completions`` answers with the next of
    ``script`` (a text, or ``{"tool_calls": [(name, arguments JSON)]}``), ``/v1/models`` lists
    ``policy``. Like the real one it needs ``Authorization: Bearer KEY`` and refuses
    ``stream``. ``requests`` holds each chat request's JSON body and headers."""

    def __init__(self) -> None:
        self.script: list[Any] = []
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        app = FastAPI()
        app.post("/sessions/{session}/v1/chat/completions")(self.chat)
        app.get("/sessions/{session}/v1/models")(self.models)
        (self.port,) = free_ports(1)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def base_url(self, session: str = SESSION) -> str:
        return f"http://127.0.0.1:{self.port}/sessions/{session}/v1"

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the scripted server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def reset(self, script: list[Any]) -> None:
        self.script, self.requests, self.headers = list(script), [], []

    async def chat(self, session: str, request: Request) -> JSONResponse:
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if body.get("stream"):
            return JSONResponse({"error": {"message": "stream: unsupported"}}, status_code=400)
        if not self.script:
            return JSONResponse({"error": {"message": "script exhausted"}}, status_code=500)
        return JSONResponse(completion(self.script.pop(0), len(self.requests)))

    async def models(self, session: str) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "policy", "object": "model", "owned_by": "x"}]}


def completion(answer: Any, number: int) -> dict[str, Any]:
    """A ``chat.completion`` whose message is ``answer``."""
    message: dict[str, Any] = {"role": "assistant", "content": answer}
    finish = "stop"
    if isinstance(answer, dict):
        calls = [
            {
                "id": f"call_{number}_{i}",
                "type": "function",
                "function": {"name": n, "arguments": a},
            }
            for i, (n, a) in enumerate(answer["tool_calls"])
        ]
        message, finish = {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
    return {
        "id": f"chatcmpl-{number}",
        "object": "chat.completion",
        "created": 0,
        "model": "policy",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
    }


@pytest.fixture(scope="module")
def server():
    double = ScriptedChatServer()
    double.start()
    yield double
    double.stop()


def play(server: ScriptedChatServer, script: list[Any], row: dict, environment: str, **kw):
    server.reset(script)

    async def episode() -> dict[str, Any]:
        client = openai.AsyncOpenAI(base_url=server.base_url(), api_key=KEY, max_retries=0)
        async with client:
            return await run(client, row, environment=environment, **kw)

    return asyncio.run(asyncio.wait_for(episode(), timeout=60))


def contents(request: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(m["role"], m.get("content")) for m in request["messages"]]


def test_single_turn_rubric_reward_comes_back(server) -> None:
    row = {"prompt": "What is 2 + 3?", "answer": "5", "other": 1}
    result = play(server, ["5"], row, f"{ENVS}:load_arithmetic")
    assert result["reward"] == 1.0
    assert result["rewards"] == {"exact_match": 1.0}
    assert result["metrics"] == {"reply_chars": 1.0}
    assert result["num_turns"] == 1
    (request,) = server.requests
    assert request == {
        "messages": [{"role": "user", "content": "What is 2 + 3?"}],
        "model": "policy",
    }
    assert server.headers[0]["authorization"] == f"Bearer {KEY}"

    assert not [name for name in os.environ if name.startswith(KEY_VARIABLE_PREFIX)]

    wrong = play(server, ["6"], row | {"id": 7}, f"{ENVS}:load_arithmetic")
    assert wrong["reward"] == 0.0 and wrong["rewards"] == {"exact_match": 0.0}


def test_concurrent_episodes_of_one_environment(server) -> None:
    server.reset(["5", "5", "5"])

    async def episodes() -> list[dict[str, Any]]:
        clients = [
            openai.AsyncOpenAI(base_url=server.base_url(f"s{i}"), api_key=KEY) for i in range(3)
        ]
        row = {"prompt": "What is 2 + 3?", "answer": "5"}
        spec = f"{ENVS}:load_arithmetic"
        return await asyncio.gather(*(run(c, row, environment=spec) for c in clients))

    results = asyncio.run(asyncio.wait_for(episodes(), timeout=60))
    assert [result["reward"] for result in results] == [1.0, 1.0, 1.0]
    assert len(server.requests) == 3


def test_chat_rows_messages_and_sampling_reach_the_endpoint(server) -> None:
    messages = [
        {"role": "system", "content": "Answer tersely."},
        {"role": "user", "content": "7+5?"},
    ]
    sampling = {"temperature": 0.5, "max_tokens": 16}
    result = play(
        server, ["12"], {"messages": messages, "answer": "12"}, f"{ENVS}:ENV", sampling=sampling
    )
    assert result["reward"] == 1.0
    (request,) = server.requests
    assert request["messages"] == messages
    assert (request["temperature"], request["max_tokens"]) == (0.5, 16)


def test_multi_turn_env_sends_hints_in_later_requests(server) -> None:
    row = {"prompt": vf_envs.SECRET_INSTRUCTIONS, "secret": 50}
    result = play(server, ["25", "I say 75", "50"], row, f"{ENVS}:load_guess")
    assert result["reward"] == 1.0
    assert result["metrics"] == {"guesses": 3.0}
    assert result["num_turns"] == 3
    assert len(server.requests) == 3
    first, second, third = map(contents, server.requests)
    assert first == [("user", vf_envs.SECRET_INSTRUCTIONS)]
    assert second == [*first, ("assistant", "25"), ("user", "Higher.")]
    assert third == [*second, ("assistant", "I say 75"), ("user", "Lower.")]


def test_multi_turn_env_stops_at_its_turn_limit(server) -> None:
    row = {"prompt": vf_envs.SECRET_INSTRUCTIONS, "secret": 50}
    result = play(server, ["1", "2"], row, f"{ENVS}:load_guess", env_args={"max_turns": 2})
    assert result["reward"] == 0.0
    assert len(server.requests) == 2
    assert result["stop_condition"] == "max_turns"


def test_tool_env_executes_the_tool_and_sends_its_result(server) -> None:
    row = {"prompt": "What is 12 * 34?", "answer": "408"}
    call = {"tool_calls": [(vf_envs.TOOL_NAME, '{"expression": "12 * 34"}')]}
    result = play(server, [call, "408"], row, f"{ENVS}:load_calculator")
    assert result["reward"] == 1.0
    assert result["metrics"] == {"tool_results": 1.0}
    first, second = server.requests
    (tool,) = first["tools"]
    assert tool["type"] == "function"
    assert tool["function"]["name"] == vf_envs.TOOL_NAME
    assert "expression" in tool["function"]["parameters"]["properties"]
    assert second["tools"] == first["tools"]
    reply = second["messages"][-1]
    assert reply["role"] == "tool" and reply["tool_call_id"] == "call_1_0"
    assert reply["content"] == "408"
    assert second["messages"][-2]["tool_calls"][0]["function"]["name"] == vf_envs.TOOL_NAME


def test_a_failed_model_call_fails_the_episode_in_one_line(server) -> None:
    with pytest.raises(VerifiersRolloutError) as failed:
        play(server, [], {"prompt": "1+1?", "answer": "2"}, f"{ENVS}:load_arithmetic")
    assert "\n" not in str(failed.value)
    assert "script exhausted" in str(failed.value)


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("no_such_module_xyz:load_environment", "cannot be imported"),
        (f"{ENVS}:no_such_loader", "cannot be imported"),
        (f"{ENVS}:first_number", "failed to load"),
        (f"{ENVS}:SECRET_INSTRUCTIONS", "neither a verifiers Env"),
        (f"{ENVS}:", "is not 'module:load_environment'"),
        ("no_such_taskset_xyz", "a verifiers taskset id"),
    ],
)
def test_a_bad_environment_spec_is_one_line_naming_it(spec: str, says: str) -> None:
    with pytest.raises(VerifiersEnvironmentError) as bad:
        verifiers_agent.load_verifiers_environment(spec)
    message = str(bad.value)
    assert "\n" not in message
    assert repr(spec) in message and says in message


def test_a_row_the_task_data_cannot_hold_is_one_line() -> None:
    env = verifiers_agent.load_verifiers_environment(f"{ENVS}:load_arithmetic")
    with pytest.raises(VerifiersEnvironmentError) as bad:
        verifiers_agent.task_from_row(env, {"prompt": "1+1?"}, "arith")
    assert "\n" not in str(bad.value) and "answer" in str(bad.value)
