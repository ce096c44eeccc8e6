"""``verifiers`` environments trained as agent workflows, through the policy's endpoint.

A job names this module's ``run`` as its agent and the environment in ``env.kwargs``::

    env:
      agent: "rlfleet.envs.verifiers_agent:run"
      kwargs:
        environment: "my_env:load_environment"   # or "my_env:ENV", or a taskset id
        env_args: {difficulty: 2}                # load_environment's keyword arguments
        sampling: {temperature: 1.0}             # optional, imposed on every request

``run(client, row, ...)`` plays ONE episode of the row's task with verifiers' own machinery and
returns the environment's own reward. This is verifiers 0.4.0, whose stack is ``verifiers.v1``
(``import verifiers.v1 as vf``; 0.4.0 has no ``SingleTurnEnv``/``MultiTurnEnv``/``ToolEnv``,
``Rubric`` nor ``Environment.rollout``). What its concepts are, and how each is used here:

- **the environment** is a ``vf.Env``: a ``vf.Taskset`` (the data half; its ``Task`` type
  carries the rubric as ``@vf.reward``/``@vf.metric`` methods and its tools as ``vf.Toolset``
  MCP servers) plus the agent seats (``vf.AgentConfig`` fields of the env's config) and, for a
  multi-turn env, the env's own ``run(task, agents)``, which drives the exchange
  (``agents.x.interaction(task)``, ``interaction.turn(feedback)``). ``environment`` names a
  function returning one (``"module:load_environment"``, called with ``env_args``), an ``Env``
  (``"module:attr"``), or, without a colon, an installed taskset id, which is how verifiers
  packages environments (``vf.load_environment`` of ``{"taskset": {"id": ...}, **env_args}``).
  It is loaded once per process and arguments.
- **the row** becomes the taskset's ``TaskData`` the way a taskset's ``load()`` builds one: the
  row's fields that the data class adds to ``vf.TaskData`` (``answer``, ``info``, ...) and its
  string ``id``/``name``/``description``/``system_prompt``, with ``prompt`` the row's
  ``messages`` (a chat row), else its ``prompt``, else its ``question``; the taskset's
  system-prompt override applies as in ``Taskset.__iter__``. Other columns are dropped.
- **the rollout** is ``Env.run_episode(task, ctx)`` inside ``Env.serving()``, as verifiers'
  eval runs one (less its episode retries, which would sample again into the same session; a
  seat's own ``retries`` still apply, 0 by default): ``ctx`` is the model ``"policy"`` on an
  ``EvalClientConfig`` made from ``client`` (its base URL, key and headers) and ``sampling``.
  Each model call of a seat goes from its harness program to verifiers' interception server,
  which records the turn on the trace and relays the request to ``client``'s endpoint
  (``vf.EvalClient``). Every seat that pins no model or client samples from the policy, an
  untrainable one too (a user simulator, a judge): all their calls land in the session.
- **the harness** (the program playing a seat) is where this differs: verifiers' own chat
  loops (``null``, ``bash``) are PEP 723 scripts that ``uv`` installs from PyPI on first use,
  and an unpinned seat runs in a remote Prime sandbox. With ``harness="inprocess"`` (the
  default) every seat whose harness is ``null``, or unpinned on a taskset without its own
  harness (verifiers' ``bash`` fallback), plays ``InProcessChatHarness``: the ``null``
  harness's chat loop (the task's prompt, its MCP tools, until a reply without tool calls),
  run in this process through the same interception endpoint and secret, with the subprocess
  runtime unless the seat pins one. It sends non-streaming requests (the scripts stream).
  ``harness="env"`` keeps every seat as the environment configures it.
- **scoring** is the task's own (``Task.score`` at the end of each agent run) and the env's
  ``finalize``. ``run`` returns ``{"reward": ..., "rewards": {...}, "metrics": {...},
  "num_turns": ..., "stop_condition": ...}`` for the episode's trainable traces (their mean
  reward), without ``"reward"`` when the environment recorded none (the job's reward functions
  then score it). A failed episode raises ``VerifiersRolloutError``.

``InProcessChatHarness`` is a verifiers harness plugin, and verifiers finds a harness by
importing its id as a top-level module: importing this module registers it under
``HARNESS_ID`` in ``sys.modules``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import json
import os
import sys
import threading
import traceback
from collections.abc import Iterator, Mapping
from typing import Any

import httpx
import openai
import verifiers.v1 as vf
from verifiers.v1.clients import EvalClientConfig, ModelContext
from verifiers.v1.configs.agent import agent_config_fields
from verifiers.v1.configs.env import default_agent_harness
from verifiers.v1.dialects.chat import message_to_wire
from verifiers.v1.errors import MODEL_TRANSPORT_ERROR_EXIT_CODE
from verifiers.v1.harnesses.utils.compaction import bound_tool_message, is_context_overflow
from verifiers.v1.harnesses.utils.mcp import call_mcp, connect_mcp

from rlfleet.common.errors import error_line, one_line, shown

__all__ = [
    "HARNESS_ID",
    "InProcessChatHarness",
    "InProcessChatHarnessConfig",
    "VerifiersEnvironmentError",
    "VerifiersRolloutError",
    "load_verifiers_environment",
    "run",
    "task_from_row",
]

MODEL = "policy"
"""The model name every seat that plays the policy asks for (the endpoint's one model)."""
HARNESS_ID = "rlfleet_inprocess_chat"
"""The verifiers harness id of ``InProcessChatHarness`` (a top-level module name)."""
REPLACED_HARNESSES = frozenset({"null"})
"""Pinned harness ids that ``harness="inprocess"`` plays in process."""
HARNESS_MODES = ("inprocess", "env")
PROMPT_FIELDS = ("messages", "prompt", "question")
"""Row fields that become ``TaskData.prompt``, the first one present winning."""
ROW_META_FIELDS = ("id", "name", "description", "system_prompt")
"""``vf.TaskData``'s own fields a row may set (when it holds a string there); the others
(``idx``, ``image``, ``timeout``, ``resources``, ...) place the run, and stay the taskset's."""
KEY_VARIABLE_PREFIX = "RLFLEET_VERIFIERS_API_KEY_"
"""verifiers reads an endpoint's key from an environment variable; one per key, named with
``API_KEY`` so verifiers' subprocess runtime never hands it to a program."""
OPENAI_HEADERS = frozenset({"accept", "content-type", "user-agent", "authorization"})
"""Headers of the openai client that are its own, not the endpoint's (nor ``x-stainless-*``)."""


class VerifiersEnvironmentError(ValueError):
    """``environment`` (or the row) names nothing verifiers can run; one line naming it."""


class VerifiersRolloutError(RuntimeError):
    """The episode failed (verifiers scores no failed run); one line with verifiers' error."""


class InProcessChatHarnessConfig(vf.HarnessConfig):
    id: str = HARNESS_ID
    max_retries: int = 2
    """How often a model call that failed to connect or got 429/5xx is retried (the
    interception server relays the endpoint's status and replays nothing twice)."""


class InProcessChatHarness(vf.Harness[InProcessChatHarnessConfig]):
    """verifiers' ``null`` harness (a tool-less chat loop plus the task's MCP tools), run in this
    process: system prompt and prompt, then chat completions until a reply without tool calls,
    each tool call answered by its MCP server (after the rollout's tool gate, when it has one).
    Model calls go to the interception ``endpoint`` with its ``secret`` like the program's."""

    APPENDS_SYSTEM_PROMPT = True
    SUPPORTS_MCP = True
    SUPPORTS_RESUME = True
    SUPPORTS_TOOL_INTERCEPTION = True
    EXECUTES_CODE = False
    NEEDS_CONTAINER = False

    async def launch(
        self,
        ctx: ModelContext,
        trace: vf.Trace,
        runtime: vf.Runtime,
        endpoint: str,
        secret: str,
        mcp_urls: dict[str, str],
        data: vf.TaskData,
        tool_interception_url: str | None = None,
    ) -> vf.ProgramResult:
        system_prompt, prompt = self.resolve_prompt(data)
        messages: list[dict[str, Any]] = []
        if system_prompt:
            messages.append({"role": "system", "content": system_prompt})
        if isinstance(prompt, str):
            messages.append({"role": "user", "content": prompt})
        elif prompt:
            messages.extend(message_to_wire(message) for message in prompt)
        mcp_config = {
            "mcpServers": {
                name: {"url": url, "timeout": self.config.tool_timeout}
                for name, url in mcp_urls.items()
            }
        }
        try:
            async with contextlib.AsyncExitStack() as stack:
                client = openai.AsyncOpenAI(
                    base_url=endpoint,
                    api_key=secret,
                    max_retries=self.config.max_retries,
                    timeout=httpx.Timeout(None, connect=5.0),
                )
                stack.push_async_callback(client.close)
                gate = None
                if tool_interception_url:
                    gate = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0))
                    stack.push_async_callback(gate.aclose)
                tools, dispatch, servers = [], {}, {}
                if mcp_urls:
                    tools, dispatch, servers = await connect_mcp(mcp_config, stack)
                chat = _ChatLoop(client, ctx.model, tools, dispatch, servers)
                await chat.run(messages, gate, tool_interception_url, secret)
        except openai.APIConnectionError as exc:
            return vf.ProgramResult(MODEL_TRANSPORT_ERROR_EXIT_CODE, "", error_line(exc))
        except Exception:  # noqa: BLE001 - the program's crash, judged by _check_result
            return vf.ProgramResult(1, "", traceback.format_exc())
        return vf.ProgramResult(0, "", "")


class _ChatLoop:
    """``run_chat_loop`` of verifiers' bundled chat program, without compaction, streaming or
    the bash/edit/search tools (the ``null`` harness enables none of them)."""

    def __init__(
        self,
        client: openai.AsyncOpenAI,
        model: str,
        tools: list[dict[str, Any]],
        dispatch: dict[str, Any],
        servers: dict[str, Any],
    ) -> None:
        self.client, self.model = client, model
        self.tools, self.dispatch, self.servers = tools, dispatch, servers

    async def run(
        self,
        messages: list[dict[str, Any]],
        gate: httpx.AsyncClient | None,
        gate_url: str | None,
        secret: str,
    ) -> None:
        while True:
            kwargs: dict[str, Any] = {"model": self.model, "messages": messages}
            if self.tools:
                kwargs["tools"] = self.tools
            try:
                completion = await self.client.chat.completions.create(**kwargs)
            except openai.APIStatusError as exc:
                if is_context_overflow(exc):
                    return  # the context is spent: the run ends with its transcript
                raise
            message = completion.choices[0].message
            messages.append(message.model_dump(exclude_none=True))
            if not message.tool_calls:
                return
            for call in message.tool_calls:
                messages.append(bound_tool_message(await self.answer(call, gate, gate_url, secret)))

    async def answer(
        self, call: Any, gate: httpx.AsyncClient | None, gate_url: str | None, secret: str
    ) -> dict[str, Any]:
        name = call.function.name
        reply = {"role": "tool", "tool_call_id": call.id, "content": "", "name": name}
        try:
            arguments = json.loads(call.function.arguments or "{}")
        except json.JSONDecodeError as exc:
            arguments, parse_error = call.function.arguments, exc
        else:
            parse_error = None
        if gate is not None and gate_url:
            response = await gate.post(
                gate_url,
                headers={"Authorization": f"Bearer {secret}"},
                json={"tool_call_id": call.id, "name": name, "arguments": arguments},
            )
            response.raise_for_status()
            decision = response.json()
            if decision["action"] == "stop":
                raise RuntimeError(decision["reason"])
            if decision["action"] == "deny":
                return decision["message"]
        if parse_error is not None:
            content = (
                f"error: invalid JSON in tool arguments ({parse_error}); resend the call with "
                "valid JSON"
            )
        elif not isinstance(arguments, dict):
            content = (
                f"error: tool arguments must be a JSON object, got {type(arguments).__name__}; "
                "resend as an object"
            )
        elif name in self.dispatch:
            content = await call_mcp(self.servers, self.dispatch, name, arguments)
        else:
            content = f"error: unknown tool {name!r}"
        return {**reply, "content": content}


# verifiers imports a harness by its id (verifiers.v1.utils.loaders._import_plugin): a top-level
# module whose __all__ exports one Harness subclass, which this module is.
sys.modules.setdefault(HARNESS_ID, sys.modules[__name__])


async def run(
    client: openai.AsyncOpenAI,
    row: Mapping[str, Any],
    *,
    environment: str,
    env_args: Mapping[str, Any] | None = None,
    sampling: Mapping[str, Any] | None = None,
    harness: str = "inprocess",
) -> dict[str, Any]:
    """One episode of ``row`` in the verifiers environment ``environment`` (see the module's
    doc), its model calls sampled through ``client``'s endpoint as model ``"policy"`` with
    ``sampling`` (verifiers' ``SamplingConfig``: ``temperature``, ``top_p``, ``max_tokens``,
    any other key passes through) imposed on every request. Returns the reward, the rubric's
    rewards and metrics, the turns and verifiers' stop condition."""
    env = load_verifiers_environment(environment, env_args, harness)
    task = task_from_row(env, row, environment)
    try:
        sampling_config = vf.SamplingConfig.model_validate(dict(sampling or {}))
    except ValueError as exc:
        raise VerifiersEnvironmentError(f"sampling: {one_line(exc)}") from None
    with _key_variable(client.api_key) as key_variable:
        ctx = ModelContext(
            model=MODEL,
            client=EvalClientConfig(
                base_url=str(client.base_url).rstrip("/"),
                api_key_var=key_variable,
                headers=_endpoint_headers(client),
                timeout=_timeout(client),
            ),
            sampling=sampling_config,
        )
        # serving() keeps its interception server and tool servers on the env object: each
        # episode gets its own shallow copy, so concurrent episodes never share them.
        episode_env = copy.copy(env)
        async with episode_env.serving():
            episode = await episode_env.run_episode(task, ctx)
    return episode_result(episode, environment)


_CACHE: dict[tuple[str, str, str], vf.Env] = {}
_CACHE_LOCK = threading.Lock()


def load_verifiers_environment(
    environment: str, env_args: Mapping[str, Any] | None = None, harness: str = "inprocess"
) -> vf.Env:
    """The ``vf.Env`` that ``environment`` names, built with ``env_args``; with ``harness``
    ``"inprocess"``, its chat seats play ``InProcessChatHarness``. Loaded once per process and
    arguments; a ``VerifiersEnvironmentError`` naming ``environment`` when it cannot be."""
    if harness not in HARNESS_MODES:
        raise VerifiersEnvironmentError(
            f"harness: {harness!r} is not one of {', '.join(map(repr, HARNESS_MODES))}"
        )
    args = dict(env_args or {})
    key = (environment, json.dumps(args, sort_keys=True, default=repr), harness)
    with _CACHE_LOCK:
        env = _CACHE.get(key)
        if env is None:
            env = _build_environment(environment, args)
            if harness == "inprocess":
                env = _with_inprocess_harness(env, environment)
            _CACHE[key] = env
    return env


def _build_environment(environment: str, args: dict[str, Any]) -> vf.Env:
    where = f"environment {environment!r}"
    if not isinstance(environment, str) or not environment.strip():
        raise VerifiersEnvironmentError(
            f"environment: {shown(environment)} is not 'module:load_environment', "
            "'module:attr' or a verifiers taskset id"
        )
    module_name, colon, attr = environment.partition(":")
    if not colon:
        return _load_taskset_environment(environment, args)
    if not module_name or not attr:
        raise VerifiersEnvironmentError(
            f"{where} is not 'module:load_environment' or 'module:attr'"
        )
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise VerifiersEnvironmentError(f"{where} cannot be imported: {one_line(exc)}") from None
    if isinstance(target, vf.Env):
        if args:
            raise VerifiersEnvironmentError(
                f"{where} is an Env, which takes no env_args (got {sorted(args)})"
            )
        return target
    if not callable(target):
        raise VerifiersEnvironmentError(
            f"{where} is a {type(target).__name__}, neither a verifiers Env nor a function "
            "returning one"
        )
    try:
        env = target(**args)
    except Exception as exc:  # noqa: BLE001 - the user's loader, reported in one line
        raise VerifiersEnvironmentError(f"{where} failed to load: {error_line(exc)}") from None
    if not isinstance(env, vf.Env):
        raise VerifiersEnvironmentError(
            f"{where} returned a {type(env).__name__}, not a verifiers Env (verifiers.v1.Env)"
        )
    return env


def _load_taskset_environment(taskset_id: str, args: dict[str, Any]) -> vf.Env:
    taskset = dict(args.get("taskset") or {})
    data = {**args, "taskset": {**taskset, "id": taskset_id}}
    try:
        return vf.load_environment(vf.resolve_env_config(data))
    except Exception as exc:  # noqa: BLE001 - verifiers' loader, reported in one line
        raise VerifiersEnvironmentError(
            f"environment {taskset_id!r} (a verifiers taskset id; use 'module:attr' for a "
            f"function or an Env) failed to load: {error_line(exc)}"
        ) from None


def _with_inprocess_harness(env: vf.Env, environment: str) -> vf.Env:
    """``env`` rebuilt with each chat seat (harness ``null``, or unpinned on verifiers' ``bash``
    fallback) playing ``InProcessChatHarness``, in the subprocess runtime unless it pins one."""
    default = default_agent_harness(env.config.taskset.id)
    updates = {}
    for name, seat in agent_config_fields(env.config).items():
        pinned = seat.harness
        chat_seat = default.id == "bash" if pinned is None else pinned.id in REPLACED_HARNESSES
        if not chat_seat:
            continue
        harness = InProcessChatHarnessConfig(tool_timeout=(pinned or default).tool_timeout)
        update: dict[str, Any] = {"harness": harness}
        if "runtime" not in seat.model_fields_set:
            update["runtime"] = vf.SubprocessConfig()
        updates[name] = seat.model_copy(update=update)
    if not updates:
        return env
    try:
        return type(env)(env.config.model_copy(update=updates))
    except Exception as exc:  # noqa: BLE001 - the user's Env, reported in one line
        raise VerifiersEnvironmentError(
            f"environment {environment!r}: {type(env).__name__} cannot be rebuilt with the "
            f"in-process harness: {error_line(exc)}"
        ) from None


def task_from_row(env: vf.Env, row: Mapping[str, Any], environment: str = "") -> vf.Task:
    """The ``Task`` of ``env``'s taskset type for ``row`` (see the module's doc)."""
    task_cls = type(env.taskset).task_type()
    data_cls = task_cls.data_type()
    fields = {
        name: row[name]
        for name in data_cls.model_fields
        if name in row
        and (
            name not in vf.TaskData.model_fields
            or name in ROW_META_FIELDS
            and isinstance(row[name], str)
        )
    }
    prompt = next((row[name] for name in PROMPT_FIELDS if row.get(name) is not None), None)
    if prompt is not None:
        fields["prompt"] = copy.deepcopy(prompt)
    if env.taskset.system_prompt is not None:
        fields["system_prompt"] = env.taskset.system_prompt
    try:
        data = data_cls.model_validate(fields)
    except ValueError as exc:
        raise VerifiersEnvironmentError(
            f"environment {environment!r}: the row is not a {data_cls.__name__}: {one_line(exc)}"
        ) from None
    return task_cls(data, env.taskset.config.task)


def episode_result(episode: vf.Episode, environment: str = "") -> dict[str, Any]:
    """``run``'s return for a finished ``episode``: its trainable traces' mean reward (left out
    when none recorded a reward), their rewards and metrics (keyed ``agent/name`` when there are
    several), turns and stop condition. A failed episode raises ``VerifiersRolloutError``."""
    if not episode.ok:
        error = episode.last_error or next(
            (trace.last_error for trace in episode.traces if trace.last_error), None
        )
        why = f"{error.type}: {one_line(error.message)}" if error else "no trace finished"
        raise VerifiersRolloutError(f"verifiers episode of {environment!r} failed: {why}")
    traces = [trace for trace in episode.traces if trace.agent.trainable] or episode.traces
    named = len(traces) > 1
    result: dict[str, Any] = {"rewards": {}, "metrics": {}}
    for trace in traces:
        prefix = f"{trace.agent.name}/" if named else ""
        result["rewards"].update(
            {f"{prefix}{k}": None if r is None else r.score for k, r in trace.rewards.items()}
        )
        result["metrics"].update({f"{prefix}{k}": v for k, v in trace.metrics.items()})
    scored = [trace.reward for trace in traces if trace.rewards]
    if scored:
        result = {"reward": sum(scored) / len(scored), **result}
    result["num_turns"] = sum(trace.num_turns for trace in traces)
    stops = [trace.stop_condition for trace in traces]
    result["stop_condition"] = stops[0] if len(stops) == 1 else stops
    return result


_KEY_USERS: dict[str, int] = {}
_KEY_LOCK = threading.Lock()


@contextlib.contextmanager
def _key_variable(api_key: str | None) -> Iterator[str]:
    """The name of an environment variable holding ``api_key`` while the block runs (verifiers'
    client configs name a variable, not a key), shared by concurrent users of one key."""
    digest = hashlib.sha256((api_key or "").encode()).hexdigest()[:16]
    name = f"{KEY_VARIABLE_PREFIX}{digest}"
    with _KEY_LOCK:
        _KEY_USERS[name] = _KEY_USERS.get(name, 0) + 1
        if api_key:
            os.environ[name] = api_key
    try:
        yield name
    finally:
        with _KEY_LOCK:
            _KEY_USERS[name] -= 1
            if not _KEY_USERS[name]:
                del _KEY_USERS[name]
                os.environ.pop(name, None)


def _endpoint_headers(client: openai.AsyncOpenAI) -> dict[str, str]:
    """The headers ``client`` adds for its endpoint (``default_headers=``), not its own."""
    return {
        name: value
        for name, value in client.default_headers.items()
        if isinstance(value, str)
        and name.lower() not in OPENAI_HEADERS
        and not name.lower().startswith("x-stainless")
    }


def _timeout(client: openai.AsyncOpenAI) -> dict[str, float | None]:
    """verifiers' endpoint timeouts from ``client``'s: its read timeout bounds a model call."""
    timeout = client.timeout
    if isinstance(timeout, int | float):
        return {"read": float(timeout)}
    if isinstance(timeout, httpx.Timeout):
        return {"read": timeout.read}
    return {}
