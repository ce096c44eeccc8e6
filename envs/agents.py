"""Agent workflows: an agent written against the OpenAI API, trained as it is.

A user names an async function ``env.agent: "module:run"``::

    async def run(client: openai.AsyncOpenAI, row: dict, **kwargs) -> float | dict | None

It runs in an environment actor (envs/actor.py: same pool, restarts and deadlines as
environments), once per trajectory. ``client`` is pointed at the trajectory's session on the
endpoint of the generator sampling it (actors/endpoint.py), with the session's key; ``row`` is
the dataset row (a dict); ``kwargs`` are ``env.kwargs``. Every call the agent makes through the
client is sampled by the policy being trained and recorded there as tokens. ``run`` returns the
reward: a number, a dict with ``"reward"`` and other JSON values kept with the trajectory, or
None to leave scoring to the job's reward functions (which see the recorded conversation).
Nothing in ``run`` needs to import rlfleet.
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass
from typing import Any

AgentFunction = Any
"""``async def run(client, row, **kwargs)``."""

CLIENT_RETRIES = 2
"""How often the client retries a request that failed to connect or got 429/5xx: a 503 means
the session's generator is being replaced."""


class AgentSpecError(ValueError):
    """``env.agent`` names nothing usable; one line naming the key."""


@dataclass(frozen=True)
class AgentAccess:
    """Where a trajectory's agent reaches the policy: its session's base URL and key."""

    base_url: str
    api_key: str


def load_agent(spec: str) -> AgentFunction:
    """The ``async`` function ``"module:function"`` names, or an ``AgentSpecError``."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise AgentSpecError(f"env.agent: {spec!r} is not 'module:function'")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise AgentSpecError(f"env.agent: cannot import {spec!r}: {exc}") from None
    if not inspect.iscoroutinefunction(function):
        raise AgentSpecError(
            f"env.agent: {spec!r} must be an async function run(client, row, **kwargs)"
        )
    return function


def shared_http_client() -> Any:
    """One HTTP client for every session client of an environment actor, made on its event
    loop: the openai package's aiohttp transport (``openai.DefaultAioHttpClient``).

    Measured on the 2-core box, 64 agents of 6 calls each: an ``openai.AsyncOpenAI`` that makes
    its own httpx client takes 20 ms to build (about a whole guess-the-number trajectory); a
    shared httpx client spends 7.2 ms of CPU a call (httpcore's pool checks every connection on
    every request), the aiohttp transport 2.2 ms."""
    import openai

    return openai.DefaultAioHttpClient()


def make_client(access: AgentAccess, timeout_s: float, http_client: Any) -> Any:
    """An ``openai.AsyncOpenAI`` of one session (the openai package's own client) over the
    actor's ``http_client``; not to be closed (that would close the shared client)."""
    import openai

    return openai.AsyncOpenAI(
        base_url=access.base_url,
        api_key=access.api_key,
        timeout=timeout_s,
        max_retries=CLIENT_RETRIES,
        http_client=http_client,
    )


def agent_result(value: Any, spec: str) -> tuple[float, dict[str, Any], bool]:
    """``run``'s return as (reward, info, scored): a number, a dict with ``reward``, or None
    (``scored`` False: the reward functions score it)."""
    if value is None:
        return 0.0, {}, False
    if isinstance(value, dict):
        info = dict(value)
        reward = info.pop("reward", None)
        if reward is None:
            return 0.0, info, False
        return _number(reward, spec), info, True
    return _number(value, spec), {}, True


def _number(value: Any, spec: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TypeError(f"agent {spec} returned {value!r}: the reward must be a finite number")
    return float(value)
