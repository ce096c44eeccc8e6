"""The environment actor: holds the environment instances of many trajectories at once.

A generator's rollout loop (actors/rollout.py) calls ``reset`` and ``step`` with a trajectory id;
the actor keeps one environment instance per live trajectory (made by the job's factory,
envs/loading.py) and answers each call with an ``EnvReply``. It is an asyncio actor: calls of
different trajectories run concurrently, an ``async`` environment on the actor's event loop and
a plain one in a worker thread, so one slow environment never holds up the others.

Every call has the deadline ``env.step_timeout_s``: past it the reply says ``timed_out`` and the
trajectory's instance is dropped (a plain environment's thread cannot be interrupted and runs on
in the background; an ``async`` one is cancelled). An environment that raises gives a reply
with ``error`` (one line naming the environment, the trajectory and the turn), never an
exception: whether that ends the trajectory or the job is the loop's decision
(``env.on_error``).

The actor is started with Ray's own restarts (``max_restarts``): one that dies comes back empty,
and the rollout loop starts each of its trajectories again from turn 0 with the same seeds.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from rlfleet.common.env_config import EnvConfig
from rlfleet.common.errors import one_line
from rlfleet.envs.agents import (
    AgentAccess,
    agent_result,
    load_agent,
    make_client,
    shared_http_client,
)
from rlfleet.envs.protocol import Observation, Step

THREADS = 256
"""Plain (not ``async``) environment calls that can run at once in one actor."""

MAX_RESTARTS = 16
"""How often Ray restarts a dead environment actor before its calls fail for good."""


@dataclass
class EnvReply:
    """What one ``reset`` or ``step`` gave, as plain data for the generator."""

    observation: Observation | None = None
    reward: float = 0.0
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    """One line when the environment raised or broke the protocol."""
    timed_out: bool = False
    lost: bool = False
    """The trajectory has no environment here: this actor restarted since its ``reset`` (the
    loop starts the trajectory again from turn 0)."""
    seconds: float = 0.0
    """How long the call took in the environment."""


class EnvActor:
    def __init__(self, index: int, config: EnvConfig) -> None:
        from rlfleet.envs.loading import load_environment_factory

        self._index = index
        self._config = config
        self._agent = load_agent(config.agent) if config.agent else None
        self._http = None
        """The agents' HTTP client (``shared_http_client``), made on the actor's event loop."""
        self._make = None if config.agent else load_environment_factory(config)
        self._envs: dict[int, Any] = {}
        self._name = config.environment or config.tools or config.agent
        self._threads = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="env")
        self._loop_threads_set = False
        """Plain environments' calls; asyncio's default pool has only a few threads, so slow
        environments of many trajectories would wait for each other."""

    def ready(self) -> bool:
        return True

    def metrics_target(self) -> None:
        """Environment actors serve no metrics of their own: their trajectories' numbers reach
        Prometheus through the driver (job/metrics.py ``EnvMetrics``)."""
        return None

    def pid(self) -> int:
        """This actor's process id (tests kill it)."""
        return os.getpid()

    def live_trajectories(self) -> int:
        return len(self._envs)

    async def reset(self, trajectory: int, row: dict[str, Any], seed: int) -> EnvReply:
        """A fresh environment for ``trajectory`` (replacing one left from an earlier attempt)
        and its first observation."""
        if not self._loop_threads_set:  # tools run their plain methods in asyncio's pool
            asyncio.get_running_loop().set_default_executor(self._threads)
            self._loop_threads_set = True
        self._envs.pop(trajectory, None)
        try:
            env = self._make()
        except Exception as exc:
            return EnvReply(error=self._describe(exc, "could not be made", trajectory, 0))
        self._envs[trajectory] = env
        reply = await self._call(trajectory, 0, "reset", env.reset, row, seed)
        if reply.error is None and not reply.timed_out:
            reply.observation = reply.info.pop("_result", None)
        return reply

    async def step(self, trajectory: int, turn: int, action: str) -> EnvReply:
        """``step(action)`` of ``trajectory``'s environment after its turn ``turn``."""
        env = self._envs.get(trajectory)
        if env is None:
            return EnvReply(lost=True)
        reply = await self._call(trajectory, turn, "step", env.step, action)
        if reply.error is None and not reply.timed_out:
            reply = self._step_reply(trajectory, turn, reply)
        if reply.done or reply.error or reply.timed_out:
            await self.close(trajectory)
        return reply

    async def run_agent(
        self, trajectory: int, row: dict[str, Any], access: AgentAccess
    ) -> EnvReply:
        """Runs the job's agent function (``env.agent``, envs/agents.py) for ``trajectory``
        with a client of its session, within ``env.trajectory_timeout_s``; its reward (or
        ``info["scored"]`` False: the reward functions score it) in the reply."""
        started = time.perf_counter()
        timeout = self._config.trajectory_timeout_s
        if self._http is None:
            self._http = shared_http_client()
        client = make_client(access, timeout, self._http)
        try:
            value = await asyncio.wait_for(
                self._agent(client, dict(row), **self._config.kwargs), timeout=timeout
            )
            reward, info, scored = agent_result(value, self._name)
        except TimeoutError:
            return EnvReply(timed_out=True, seconds=time.perf_counter() - started)
        except Exception as exc:
            return EnvReply(
                error=self._describe(exc, "the agent raised", trajectory, 0),
                seconds=time.perf_counter() - started,
            )
        info["scored"] = scored
        return EnvReply(reward=reward, info=info, seconds=time.perf_counter() - started)

    async def close(self, trajectory: int) -> None:
        """Drops ``trajectory``'s environment (calling its ``close()`` if it has one, awaited
        when it is ``async``)."""
        env = self._envs.pop(trajectory, None)
        closer = getattr(env, "close", None)
        if callable(closer):
            try:
                result = closer()
                if inspect.isawaitable(result):
                    await result
            except Exception:  # noqa: BLE001 - a failing close loses nothing the job needs
                pass

    async def _call(
        self, trajectory: int, turn: int, what: str, method: Any, *args: Any
    ) -> EnvReply:
        started = time.perf_counter()
        try:
            result = await asyncio.wait_for(
                self._run(method, *args), timeout=self._config.step_timeout_s
            )
        except TimeoutError:
            self._envs.pop(trajectory, None)
            return EnvReply(timed_out=True, seconds=time.perf_counter() - started)
        except Exception as exc:
            return EnvReply(
                error=self._describe(exc, f"{what} raised", trajectory, turn),
                seconds=time.perf_counter() - started,
            )
        return EnvReply(info={"_result": result}, seconds=time.perf_counter() - started)

    async def _run(self, method: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        if inspect.iscoroutinefunction(method):
            return await method(*args)
        result = await loop.run_in_executor(self._threads, method, *args)
        return await result if inspect.isawaitable(result) else result

    def _step_reply(self, trajectory: int, turn: int, reply: EnvReply) -> EnvReply:
        step = reply.info.pop("_result", None)
        if not isinstance(step, Step):
            return EnvReply(
                error=f"env {self._name}: step() of trajectory {trajectory} at turn {turn} "
                f"returned {type(step).__name__}, not a rlfleet.envs.protocol.Step",
                seconds=reply.seconds,
            )
        return EnvReply(
            observation=step.observation,
            reward=float(step.reward),
            done=bool(step.done),
            info=dict(step.info or {}),
            seconds=reply.seconds,
        )

    def _describe(self, exc: BaseException, what: str, trajectory: int, turn: int) -> str:
        return (
            f"env {self._name} (env actor {self._index}): {what} for trajectory {trajectory} "
            f"at turn {turn}: {type(exc).__name__}: {one_line(exc)}"
        )


def env_actor_options(config: EnvConfig) -> dict[str, Any]:
    """Ray options of one environment actor: its CPUs, Ray's restarts, and enough concurrency
    for every trajectory it may hold."""
    return {
        "num_cpus": config.num_cpus,
        "max_restarts": MAX_RESTARTS,
        "max_task_retries": 0,
        "max_concurrency": 1000,
    }
