"""The policy's OpenAI-compatible endpoint, served by each generator of an agent job.

An agent workflow (``env.agent``, envs/agents.py) gets an ``openai.AsyncOpenAI`` client whose
base URL is its trajectory's *session* on the generator sampling it:
``http://<host>:<port>/sessions/<session id>/v1``. There it may call ``/chat/completions``
(``messages``, ``tools``, ``tool_choice``, ``n``, ``temperature``, ``top_p``, ``max_tokens``,
``logprobs``), ``/completions`` (a text or token-id prompt) and ``/models`` (one model,
``policy``; any ``model`` name is accepted).

The server is fastapi on uvicorn, in a thread of the generator's process, listening on the
node's cluster-internal address (127.0.0.1 in a local job) on a free port. It never samples: a
request becomes prompt ids (actors/agent_calls.py extends the session's record when it can)
and goes to the generator's sampling thread through ``requests``; the thread answers through a
future with the ids the engine sampled, which are recorded under the session before the text
goes back. The agent never handles tokens, and the learner trains on exactly these.

**Access.** Every request needs ``Authorization: Bearer <key>``, where the key is the session's
own (``session_key``: an HMAC of the session id under the job's secret token): none or a wrong
one is 401, another session's key is 403, so one trajectory can neither read nor add to
another's record. A session that is not (or no longer) sampled here is 503: its trajectory
ended, or its generator is being replaced. A request over the trajectory's token budget is
400, naming the limit. Prompts and completions are never logged (uvicorn's access log is off).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from rlfleet.actors.agent_calls import AgentSession, BudgetError, Call, Choice, Message, tools_key
from rlfleet.actors.engine import SamplingSpec
from rlfleet.actors.rollout import turn_seed
from rlfleet.actors.turns import TurnTokens
from rlfleet.envs.parsers import ToolCall, get_tool_parser

MODEL_NAME = "policy"
STARTUP_TIMEOUT_S = 30.0


def session_key(token: str, session_id: str) -> str:
    """The API key of one session: only the job's driver and generators know ``token``."""
    return hmac.new(token.encode(), session_id.encode(), hashlib.sha256).hexdigest()


class EndpointError(Exception):
    """An answer other than 200: the HTTP status and one line for the client."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


@dataclass
class EndpointRequest:
    """One completion for the sampling thread to make: ``future`` gets its ``Choice``."""

    session: AgentSession
    prompt_ids: list[int]
    params: SamplingSpec
    future: Future


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = MODEL_NAME
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    n: PositiveInt = 1
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool | None = False
    stop: str | list[str] | None = None
    stream: bool | None = False
    return_token_ids: bool | None = False
    """vLLM's extension: the answer carries ``prompt_token_ids`` and each choice's
    ``token_ids``, the ids the engine was given and sampled."""


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = MODEL_NAME
    prompt: str | list[int]
    n: PositiveInt = 1
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: PositiveInt | None = None
    logprobs: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    return_token_ids: bool | None = False


class Endpoint:
    """The HTTP server of one generator and the sessions it samples."""

    def __init__(
        self,
        tokenizer: Any,
        token: str,
        host: str,
        sampling: SamplingSpec,
        tool_parser: str = "hermes",
    ) -> None:
        self._tokenizer = tokenizer
        self._token = token
        self._sampling = sampling
        self._parse_tools = get_tool_parser(tool_parser)
        self._sessions: dict[str, AgentSession] = {}
        self._turns: dict[str, TurnTokens] = {}
        self.requests: queue.SimpleQueue[EndpointRequest] = queue.SimpleQueue()
        """What the sampling thread takes (``take``)."""
        self.host = host
        self.port = self._serve(host)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def session_url(self, session_id: str) -> str:
        return f"{self.url}/sessions/{session_id}/v1"

    def open(self, session: AgentSession) -> str:
        """Starts serving ``session``; returns its key."""
        self._sessions[session.session_id] = session
        return session_key(self._token, session.session_id)

    def close(self, session_id: str) -> AgentSession | None:
        """Stops serving a session (later requests get 503); returns it."""
        session = self._sessions.pop(session_id, None)
        if session is not None:
            session.closed = True
        return session

    def take(self, wait_s: float = 0.0) -> list[EndpointRequest]:
        """The requests that arrived, waiting up to ``wait_s`` for the first."""
        taken = []
        try:
            taken.append(
                self.requests.get(timeout=wait_s) if wait_s else self.requests.get_nowait()
            )
            while True:
                taken.append(self.requests.get_nowait())
        except queue.Empty:
            pass
        return taken

    def stop(self) -> None:
        self._server.should_exit = True

    # -- serving ----------------------------------------------------------------------------------

    def _serve(self, host: str) -> int:
        import uvicorn

        config = uvicorn.Config(
            self._app(), host=host, port=0, log_level="warning", access_log=False, lifespan="off"
        )
        self._server = uvicorn.Server(config)
        thread = threading.Thread(target=self._server.run, name="endpoint", daemon=True)
        thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self._server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the agent endpoint could not start on {host}")
            time.sleep(0.01)
        return self._server.servers[0].sockets[0].getsockname()[1]

    def _app(self) -> FastAPI:
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

        @app.exception_handler(EndpointError)
        async def endpoint_error(_: Request, exc: EndpointError) -> JSONResponse:
            return _error(exc.status, str(exc), exc.param)

        @app.exception_handler(RequestValidationError)
        async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
            first = exc.errors()[0] if exc.errors() else {}
            field = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
            return _error(400, f"{field or 'request'}: {first.get('msg', 'invalid')}", field)

        @app.get("/sessions/{session_id}/v1/models")
        async def models(session_id: str, request: Request) -> dict:
            self._session(session_id, request)
            model = {"id": MODEL_NAME, "object": "model", "created": 0, "owned_by": "rlfleet"}
            return {"object": "list", "data": [model]}

        @app.post("/sessions/{session_id}/v1/chat/completions")
        async def chat(session_id: str, body: ChatRequest, request: Request) -> dict:
            session = self._session(session_id, request)
            _refuse_unsupported(body.stream, body.stop)
            turns = self._turns_for(body.tools)
            try:
                prompt_ids = session.chat_prompt(_renderable(body.messages), body.tools, turns)
            except Exception as exc:  # noqa: BLE001 - a template error is the client's to fix
                message = f"messages: cannot be rendered: {exc}"
                raise EndpointError(400, message, "messages") from None
            requested = body.max_completion_tokens or body.max_tokens
            choices = await self._sample(session, prompt_ids, requested, body)
            parse = bool(body.tools) and body.tool_choice != "none"
            for index, choice in enumerate(choices):
                choice.message = self._message(choice, parse, f"{session.session_id}-{index}")
            session.record(Call(prompt_ids, choices, list(body.messages), tools_key(body.tools)))
            answer = self._chat_response(prompt_ids, choices, bool(body.logprobs))
            return _with_token_ids(answer, prompt_ids, choices) if body.return_token_ids else answer

        @app.post("/sessions/{session_id}/v1/completions")
        async def completions(session_id: str, body: CompletionRequest, request: Request) -> dict:
            session = self._session(session_id, request)
            _refuse_unsupported(body.stream, body.stop)
            prompt_ids = (
                list(body.prompt)
                if isinstance(body.prompt, list)
                else self._tokenizer.encode(body.prompt, add_special_tokens=False)
            )
            if not prompt_ids:
                raise EndpointError(400, "prompt: empty", "prompt")
            choices = await self._sample(session, prompt_ids, body.max_tokens, body)
            session.record(Call(prompt_ids, choices))
            answer = self._completion_response(prompt_ids, choices, body.logprobs is not None)
            return _with_token_ids(answer, prompt_ids, choices) if body.return_token_ids else answer

        return app

    def _session(self, session_id: str, request: Request) -> AgentSession:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise EndpointError(401, "no API key: send the session's key as a Bearer token")
        if not hmac.compare_digest(key, session_key(self._token, session_id)):
            if any(
                hmac.compare_digest(key, session_key(self._token, other))
                for other in list(self._sessions)
            ):
                raise EndpointError(403, "this key belongs to another session")
            raise EndpointError(401, "wrong API key for this session")
        session = self._sessions.get(session_id)
        if session is None or session.closed:
            raise EndpointError(503, "this session is not sampled here (it ended or moved)")
        return session

    def _turns_for(self, tools: list[dict] | None) -> TurnTokens:
        key = tools_key(tools)
        if key not in self._turns:
            self._turns[key] = TurnTokens(self._tokenizer, tools)
        return self._turns[key]

    async def _sample(
        self, session: AgentSession, prompt_ids: list[int], requested: int | None, body: Any
    ) -> list[Choice]:
        try:
            max_tokens = session.max_tokens(prompt_ids, requested)
        except BudgetError as exc:
            raise EndpointError(400, str(exc), "max_tokens") from None
        call = session.next_call()
        params = replace(self._sampling, max_new_tokens=max_tokens)
        if body.temperature is not None:
            params = replace(params, temperature=body.temperature)
        if body.top_p is not None:
            params = replace(params, top_p=body.top_p)
        futures = []
        for index in range(body.n):
            seed = turn_seed(session.seed, call)
            seed = seed if index == 0 else turn_seed(seed, index)
            future: Future = Future()
            self.requests.put(
                EndpointRequest(session, prompt_ids, replace(params, seeds=(seed,)), future)
            )
            futures.append(future)
        try:
            return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
        except SessionEnded:
            raise EndpointError(503, "this session ended while it sampled") from None

    def _message(self, choice: Choice, parse_tools: bool, call_id: str) -> Message:
        turns = self._turns_for(None)
        stops = self._sampling.stop_token_ids
        text = turns.turn_text(choice.token_ids, choice.finish_reason, stops)
        message: Message = {"role": "assistant", "content": text}
        if not parse_tools:
            return message
        parsed = self._parse_tools(text)
        calls = [item for item in parsed.items if isinstance(item, ToolCall)]
        if not calls:
            return message
        content = text
        for call in calls:
            content = content.replace(call.text, "", 1)
        message["content"] = content.strip() or None
        message["tool_calls"] = [
            {
                "id": f"call-{call_id}-{index}",
                "type": "function",
                "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
            }
            for index, call in enumerate(calls)
        ]
        return message

    def _chat_response(
        self, prompt_ids: list[int], choices: list[Choice], logprobs: bool
    ) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{time.monotonic_ns()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": MODEL_NAME,
            "choices": [
                {
                    "index": index,
                    "message": choice.message,
                    "finish_reason": "tool_calls"
                    if choice.message and choice.message.get("tool_calls")
                    else choice.finish_reason,
                    "logprobs": {"content": self._token_logprobs(choice)} if logprobs else None,
                }
                for index, choice in enumerate(choices)
            ],
            "usage": _usage(prompt_ids, choices),
        }

    def _completion_response(
        self, prompt_ids: list[int], choices: list[Choice], logprobs: bool
    ) -> dict[str, Any]:
        def text_logprobs(choice: Choice) -> dict[str, Any]:
            tokens = self._tokenizer.convert_ids_to_tokens(choice.token_ids)
            return {"tokens": tokens, "token_logprobs": choice.logprobs}

        return {
            "id": f"cmpl-{time.monotonic_ns()}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": MODEL_NAME,
            "choices": [
                {
                    "index": index,
                    "text": self._tokenizer.decode(choice.token_ids, skip_special_tokens=True),
                    "finish_reason": choice.finish_reason,
                    "logprobs": text_logprobs(choice) if logprobs else None,
                }
                for index, choice in enumerate(choices)
            ],
            "usage": _usage(prompt_ids, choices),
        }

    def _token_logprobs(self, choice: Choice) -> list[dict[str, Any]]:
        tokens = self._tokenizer.convert_ids_to_tokens(choice.token_ids)
        return [
            {"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": []}
            for token, logprob in zip(tokens, choice.logprobs, strict=True)
        ]


class SessionEnded(Exception):
    """Set on the futures of a session's requests when the session closed before they were
    sampled (the endpoint answers 503)."""


def _refuse_unsupported(stream: bool | None, stop: str | list[str] | None) -> None:
    if stream:
        raise EndpointError(400, "stream: streaming is not supported; send stream=false", "stream")
    if stop:
        raise EndpointError(
            400,
            "stop: stop strings are not supported (the engine stops at the chat template's end "
            "of turn); leave stop out",
            "stop",
        )


def _renderable(messages: list[Message]) -> list[Message]:
    """Messages as chat templates expect them: tool-call arguments as objects (the OpenAI
    format sends them as JSON strings)."""
    rendered = []
    for message in messages:
        calls = message.get("tool_calls")
        if calls:
            message = {**message, "tool_calls": [_parsed_arguments(call) for call in calls]}
        rendered.append(message)
    return rendered


def _parsed_arguments(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    if isinstance(function.get("arguments"), str):
        try:
            function["arguments"] = json.loads(function["arguments"])
        except ValueError:
            pass
    return {**call, "function": function}


def _with_token_ids(
    answer: dict[str, Any], prompt_ids: list[int], choices: list[Choice]
) -> dict[str, Any]:
    answer["prompt_token_ids"] = prompt_ids
    for entry, choice in zip(answer["choices"], choices, strict=True):
        entry["token_ids"] = choice.token_ids
    return answer


def _usage(prompt_ids: list[int], choices: list[Choice]) -> dict[str, int]:
    completion = sum(len(c.token_ids) for c in choices)
    return {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": completion,
        "total_tokens": len(prompt_ids) + completion,
    }


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kinds = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error"}
    body = {"message": message, "type": kinds.get(status, "server_error"), "param": param}
    return JSONResponse(status_code=status, content={"error": body})
