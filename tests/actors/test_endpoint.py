"""The agent endpoint over real HTTP with the real ``openai`` client: access (401, 403, 503),
budgets (400), answers in the OpenAI format, and prompts that extend the session's record.

The engine is a stand-in here (``ScriptedSampler``, a thread answering each request with the
ids it is told to): the endpoint never samples itself, and tests/job/test_agent_job.py runs it
with a real vLLM engine."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from pathlib import Path

import httpx
import openai
import pytest

from rlfleet.actors.agent_calls import AgentSession, Budget, Choice, fill_trajectory
from rlfleet.actors.endpoint import Endpoint, session_key
from rlfleet.actors.engine import SamplingSpec
from rlfleet.actors.rollout import Trajectory, turn_seed
from rlfleet.actors.turns import TurnTokens
from rlfleet.tasks.openai_agents import CALCULATOR_TOOL

TOKEN = "job-secret"


@pytest.fixture(scope="module")
def tool_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rlfleet.tasks.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tool-model"), tools=True, n_positions=1024)


@pytest.fixture(scope="module")
def tokenizer(tool_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tool_model_dir))


class ScriptedSampler:
    """The engine's side of the endpoint: answers each request with the next scripted text's
    ids plus the end-of-turn id, and keeps every request it answered."""

    def __init__(self, endpoint: Endpoint, tokenizer, texts: list[str]) -> None:
        self.endpoint, self.tokenizer, self.texts = endpoint, tokenizer, list(texts)
        self.requests: list = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        while not self.stopped.is_set():
            for request in self.endpoint.take(0.01):
                self.requests.append(request)
                text = self.texts.pop(0) if self.texts else "done"
                ids = self.tokenizer.encode(text, add_special_tokens=False)[
                    : request.params.max_new_tokens - 1
                ]
                ids.append(end)
                choice = Choice(ids, [-0.5] * len(ids), [3] * len(ids), "stop")
                request.future.set_result(choice)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


@pytest.fixture
def served(tokenizer):
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    spec = SamplingSpec(max_new_tokens=64, stop_token_ids=(end,))
    endpoint = Endpoint(tokenizer, TOKEN, "127.0.0.1", spec)
    yield endpoint
    endpoint.stop()


def open_session(endpoint: Endpoint, rollout_id: int = 7, total: int = 200) -> AgentSession:
    session = AgentSession(f"s{rollout_id}", rollout_id, 1234, Budget(total, 64, 1024))
    endpoint.open(session)
    return session


def client_of(endpoint: Endpoint, session: AgentSession, key: str | None = None):
    return openai.AsyncOpenAI(
        base_url=endpoint.session_url(session.session_id),
        api_key=key or session_key(TOKEN, session.session_id),
        max_retries=0,
    )


CALC = CALCULATOR_TOOL


def test_a_conversation_with_tool_calls_is_one_chain_of_the_engine_s_ids(served, tokenizer) -> None:
    """Three calls of an agent (a tool call, its result, a user turn): every prompt extends the
    last prompt and the sampled ids, token for token, and the sample is that chain."""
    call_text = (
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2*3"}}\n</tool_call>'
    )
    sampler = ScriptedSampler(served, tokenizer, [call_text, "it is 6", "yes 6"])
    session = open_session(served)

    async def agent() -> list:
        client = client_of(served, session)
        messages = [{"role": "user", "content": "What is 2*3?"}]
        answers = []
        for follow_up in (None, {"role": "user", "content": "Sure?"}, None):
            answer = await client.chat.completions.create(
                model="anything",
                messages=messages,
                tools=[CALC],
                extra_body={"return_token_ids": True},
            )
            answers.append(answer)
            message = answer.choices[0].message
            messages.append(message.model_dump(exclude_none=True))
            if message.tool_calls:
                call = message.tool_calls[0]
                messages.append({"role": "tool", "tool_call_id": call.id, "content": "6"})
            elif follow_up is not None:
                messages.append(follow_up)
            else:
                break
        await client.close()
        return answers

    try:
        answers = asyncio.run(agent())
    finally:
        sampler.stop()
    first = answers[0].choices[0]
    assert first.finish_reason == "tool_calls", first.message
    assert first.finish_reason == "tool_calls" and first.message.content is None
    assert first.message.tool_calls[0].function.name == "calculator"
    assert json.loads(first.message.tool_calls[0].function.arguments) == {"expression": "2*3"}
    assert answers[1].choices[0].message.content == "it is 6"
    assert len(session.calls) == 3
    for before, after in zip(session.calls, session.calls[1:], strict=False):
        assert after.prompt_ids[: len(before.prompt_ids)] == before.prompt_ids
        sampled = before.prompt_ids + before.choices[0].token_ids
        assert after.prompt_ids[: len(sampled)] == sampled
    for answer, call in zip(answers, session.calls, strict=True):  # what the client was told
        assert answer.model_extra["prompt_token_ids"] == call.prompt_ids
        assert answer.choices[0].model_extra["token_ids"] == call.choices[0].token_ids
    trajectory = Trajectory(7, 1234, {}, session.calls[0].prompt_ids)
    assert fill_trajectory(trajectory, session.calls) == 0
    assert trajectory.prompt_ids == session.calls[0].prompt_ids
    full = trajectory.prompt_ids + trajectory.response_ids
    assert full == session.calls[-1].prompt_ids + session.calls[-1].choices[0].token_ids
    sampled = [i for i, m in zip(trajectory.response_ids, trajectory.loss_mask, strict=True) if m]
    assert sampled == [i for call in session.calls for i in call.choices[0].token_ids]
    assert trajectory.turns == 3 and trajectory.versions[-1] == 3
    seeds = [request.params.seeds for request in sampler.requests]
    assert seeds == [(turn_seed(1234, call),) for call in range(3)]
    tool_result = tokenizer.decode(trajectory.response_ids)
    assert "<tool_response>\n6\n</tool_response>" in tool_result  # the template's rendering


def test_a_rewritten_history_splits_the_trajectory(served, tokenizer) -> None:
    sampler = ScriptedSampler(served, tokenizer, ["one", "two"])
    session = open_session(served)

    async def agent() -> None:
        client = client_of(served, session)
        await client.chat.completions.create(
            model="policy", messages=[{"role": "user", "content": "hi"}]
        )
        await client.chat.completions.create(  # the history was rewritten: rendered afresh
            model="policy", messages=[{"role": "user", "content": "hello again"}]
        )
        await client.close()

    try:
        asyncio.run(agent())
    finally:
        sampler.stop()
    trajectory = Trajectory(7, 1234, {}, [1])
    assert fill_trajectory(trajectory, session.calls) == 1
    assert trajectory.prompt_ids == session.calls[1].prompt_ids
    assert trajectory.response_ids == session.calls[1].choices[0].token_ids


def test_completions_take_text_or_ids_and_report_logprobs(served, tokenizer) -> None:
    sampler = ScriptedSampler(served, tokenizer, ["abc", "def"])
    session = open_session(served)

    async def agent():
        client = client_of(served, session)
        text = await client.completions.create(model="policy", prompt="the movie", logprobs=1)
        ids = await client.completions.create(
            model="policy", prompt=[5, 6, 7], max_tokens=4, extra_body={"return_token_ids": True}
        )
        models = await client.models.list()
        await client.close()
        return text, ids, models

    try:
        text, ids, models = asyncio.run(agent())
    finally:
        sampler.stop()
    assert text.choices[0].text == "abc"
    assert text.choices[0].logprobs.token_logprobs == [-0.5] * len(
        session.calls[0].choices[0].token_ids
    )
    assert ids.model_extra["prompt_token_ids"] == [5, 6, 7]
    assert len(ids.choices[0].model_extra["token_ids"]) <= 4
    assert [m.id for m in models.data] == ["policy"]


def status_of(endpoint: Endpoint, session_id: str, key: str | None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    reply = httpx.post(
        f"{endpoint.session_url(session_id)}/chat/completions",
        json={"model": "policy", "messages": [{"role": "user", "content": "hi"}]},
        headers=headers,
        timeout=10,
    )
    return reply.status_code, reply.json()["error"]["message"] if reply.status_code != 200 else ""


def test_access_needs_the_session_s_own_key(served, tokenizer) -> None:
    sampler = ScriptedSampler(served, tokenizer, [])
    mine, other = open_session(served, 1), open_session(served, 2)
    try:
        assert status_of(served, mine.session_id, None)[0] == 401
        assert status_of(served, mine.session_id, "guess")[0] == 401
        assert status_of(served, mine.session_id, session_key("other-job", "s1"))[0] == 401
        code, message = status_of(served, mine.session_id, session_key(TOKEN, other.session_id))
        assert (code, message) == (403, "this key belongs to another session")
        assert status_of(served, mine.session_id, session_key(TOKEN, mine.session_id))[0] == 200
        served.close(mine.session_id)
        assert status_of(served, mine.session_id, session_key(TOKEN, mine.session_id))[0] == 503
    finally:
        sampler.stop()
    assert len(mine.calls) == 1 and not other.calls  # nothing reached the other session


def test_requests_over_the_budget_or_unsupported_are_400_naming_the_limit(
    served, tokenizer
) -> None:
    sampler = ScriptedSampler(served, tokenizer, [])
    session = open_session(served, total=10)

    async def call(**kwargs):
        client = client_of(served, session)
        try:
            await client.chat.completions.create(
                model="policy", messages=[{"role": "user", "content": "hi"}], **kwargs
            )
        finally:
            await client.close()

    try:
        with pytest.raises(openai.BadRequestError, match="env.max_total_tokens 10"):
            asyncio.run(call(max_tokens=50))
        with pytest.raises(openai.BadRequestError, match="stream"):
            asyncio.run(call(stream=True))
        with pytest.raises(openai.BadRequestError, match="n: Input should be greater than 0"):
            asyncio.run(call(n=0))
    finally:
        sampler.stop()
    assert not session.calls


def test_the_endpoint_listens_on_the_address_it_was_given_only(served) -> None:
    outward = socket.gethostbyname(socket.gethostname())
    if outward.startswith("127."):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.255.255.255", 1))  # no packet is sent
            outward = probe.getsockname()[0]
    if outward.startswith("127."):
        pytest.skip("this machine has no non-loopback address to try")
    with pytest.raises(OSError):
        socket.create_connection((outward, served.port), timeout=2)
    socket.create_connection(("127.0.0.1", served.port), timeout=2).close()


def test_a_session_s_prompt_extends_only_its_own_calls(tokenizer) -> None:
    """The record's extension compares what the template renders, not a client's own fields."""
    turns = TurnTokens(tokenizer)
    session = AgentSession("s", 1, 0, Budget(100, 10, 1024))
    first = [{"role": "user", "content": "hi"}]
    prompt = turns.prompt_ids(first)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    sampled = tokenizer.encode("hey", add_special_tokens=False) + [end]
    answer = {"role": "assistant", "content": "hey"}
    from rlfleet.actors.agent_calls import Call

    session.record(Call(prompt, [Choice(sampled, [0.0] * 4, [0] * 4, "stop", answer)], first))
    client_copy = {**answer, "refusal": None, "tool_calls": None}
    follow = [*first, client_copy, {"role": "user", "content": "more"}]
    extended = session.chat_prompt(follow, None, turns)
    assert extended[: len(prompt) + len(sampled)] == prompt + sampled
    assert extended == prompt + sampled + turns.closing_ids(sampled) + turns.observation_ids(
        follow[2:]
    )
    rewritten = [*first, {"role": "assistant", "content": "HEY"}, follow[2]]
    assert session.chat_prompt(rewritten, None, turns) == turns.prompt_ids(rewritten)


def test_n_choices_are_sampled_with_their_own_seeds_and_either_extends_the_record(
    served, tokenizer
) -> None:
    sampler = ScriptedSampler(served, tokenizer, ["red", "blue", "green"])
    session = open_session(served)

    async def agent():
        client = client_of(served, session)
        first = await client.chat.completions.create(
            model="policy", messages=[{"role": "user", "content": "a color?"}], n=2
        )
        chosen = first.choices[1].message
        messages = [
            {"role": "user", "content": "a color?"},
            chosen.model_dump(exclude_none=True),
            {"role": "user", "content": "another?"},
        ]
        await client.chat.completions.create(model="policy", messages=messages)
        await client.close()
        return first

    try:
        first = asyncio.run(agent())
    finally:
        sampler.stop()
    assert [c.message.content for c in first.choices] == ["red", "blue"]
    seeds = [request.params.seeds[0] for request in sampler.requests]
    assert seeds[0] == turn_seed(1234, 0) and seeds[1] == turn_seed(turn_seed(1234, 0), 1)
    assert len(set(seeds)) == 3
    trajectory = Trajectory(7, 1234, {}, [1])
    assert fill_trajectory(trajectory, session.calls) == 0  # the second choice was continued
    sampled = [i for i, m in zip(trajectory.response_ids, trajectory.loss_mask, strict=True) if m]
    assert sampled == session.calls[0].choices[1].token_ids + session.calls[1].choices[0].token_ids
