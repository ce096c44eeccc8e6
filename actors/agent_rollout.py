"""The agent rollout loop: a generator's trajectories run by agent workflows (``env.agent``).

Each trajectory is one call of its agent function in an environment actor (envs/agents.py),
given a client of the trajectory's session on this generator's endpoint (actors/endpoint.py).
While the agents run, this loop is the endpoint's sampling thread: it takes the requests that
arrived, submits each to the engine as soon as it comes (request-level, like the multi-turn loop
in actors/rollout.py, so one agent's slow tool never holds up the others), answers them as the
engine finishes them, and collects the agents' returns. A trajectory's sample is its recorded
calls (actors/agent_calls.py): the engine's ids, never re-tokenized.

A call's sampling seed derives from the rollout's seed and the call's index, so a trajectory
started again (its environment actor died) samples what it sampled before.

An agent whose request was refused for the token budget (``env.max_total_tokens``; the
endpoint answers 400) and that then raised ends like a native trajectory at its budget: its
calls are trained, ``finish_reason`` ``"length"``, no reward of its own.

Faults end one trajectory, never the batch: an agent that raises, runs past
``env.trajectory_timeout_s`` or never called the endpoint is *dropped*: its row is kept (every
id of the batch is accounted for) with a loss mask of zeros, so nothing of it is trained, its
``finish_reason`` says why (``agent_error``, ``agent_timeout``, ``agent_no_calls``) and a log
line names the trajectory.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import ray

from rlfleet.actors.agent_calls import AgentSession, Budget, Choice, fill_trajectory
from rlfleet.actors.endpoint import Endpoint, EndpointRequest, SessionEnded
from rlfleet.actors.engine import Completion, RequestEngine
from rlfleet.actors.rollout import MAX_ENV_RESTARTS, REPLY_CHECK_S, REPLY_GRACE_S, Trajectory
from rlfleet.common.env_config import EnvConfig
from rlfleet.envs.actor import EnvReply
from rlfleet.envs.agents import AgentAccess

logger = logging.getLogger(__name__)

RETURN_CHECK_BUSY_S = 0.05
"""While the engine samples, agents' returns are looked for at most this often: unlike the
multi-turn loop's environment replies, a return carries no request (the agent's calls come over
HTTP), only its trajectory's end, so it can wait; each look (``ray.wait`` on every agent) costs
1.5-2 ms of the sampling thread (bench/agent_endpoint.py: 0.70x the native loop's tokens/s
with a look every 10 ms)."""

IDLE_WAIT_S = REPLY_CHECK_S
"""With nothing to sample, how long the loop waits for a request (it wakes as soon as one
arrives) before it looks for agents' returns again: a look (``ray.wait``) costs 1.5-2 ms, and a
request that waited behind one would wait for the engine as long."""


@dataclass
class _Request:
    request: EndpointRequest
    budget: int
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    """What was sampled before an interruption (new weights), continued from."""


class AgentRollout:
    """Runs the trajectories of one prompt batch to the end (``run``); ``between_steps`` and
    ``version`` as ``MultiTurnRollout``'s (new weights mid-request in asynchronous mode)."""

    def __init__(
        self,
        engine: RequestEngine,
        endpoint: Endpoint,
        envs: list[Any],
        config: EnvConfig,
        per_call_tokens: int,
        context: int,
        between_steps: Callable[[AgentRollout], None] | None = None,
        version: Callable[[], int] = lambda: 0,
    ) -> None:
        self._engine = engine
        self._endpoint = endpoint
        self._envs = envs
        self._config = config
        self._budget = Budget(config.max_total_tokens, per_call_tokens, context)
        self._between_steps = between_steps
        self._version = version
        self._keys = itertools.count()
        self._requests: dict[str, _Request] = {}
        self._pending: dict[Any, tuple[Trajectory, AgentSession, float]] = {}

    def run(self, trajectories: list[Trajectory]) -> list[Trajectory]:
        """Every trajectory to its end; returns them in the order given. Requests still in
        the engine when the last agent is back (an agent that raised or timed out with a call
        out) are sampled to their end first, within their token budget: none is left in the
        engine for the next batch."""
        for trajectory in trajectories:
            self._launch(trajectory)
        checked = 0.0
        try:
            while self._pending or self._requests:
                if self._between_steps is not None:
                    self._between_steps(self)
                busy = self._engine.busy()
                for request in self._endpoint.take(0.0 if busy else IDLE_WAIT_S):
                    self._submit(request)
                if self._engine.busy():
                    for key, completion in self._engine.poll():
                        self._sampled(key, completion)
                every = RETURN_CHECK_BUSY_S if self._engine.busy() else REPLY_CHECK_S
                if time.monotonic() - checked >= every:
                    checked = time.monotonic()
                    self._collect_returns()
        finally:
            for _, session, _ in self._pending.values():
                self._endpoint.close(session.session_id)
            for request in self._endpoint.take():  # the batch's sessions are all closed now
                request.future.set_exception(SessionEnded())
        return trajectories

    def interrupt(self) -> list[str]:
        """Stops every request in flight where it is (new weights); ``resume`` continues them."""
        stopped = []
        for key, partial in self._engine.interrupt():
            pending = self._requests[key]
            pending.ids += partial.token_ids
            pending.logprobs += partial.logprobs
            pending.versions += [self._version()] * len(partial.token_ids)
            stopped.append(key)
        return stopped

    def resume(self, stopped: list[str]) -> None:
        for key in stopped:
            pending = self._requests[key]
            left = pending.budget - len(pending.ids)
            if left <= 0:
                self._sampled(key, Completion([], [], "length"))
                continue
            params = replace(pending.request.params, max_new_tokens=left)
            self._engine.submit(key, pending.request.prompt_ids + pending.ids, params)

    # -- agents -----------------------------------------------------------------------------------

    def _launch(self, trajectory: Trajectory) -> None:
        session_id = f"{trajectory.rollout_id}-{trajectory.restarts}-{secrets.token_hex(8)}"
        session = AgentSession(session_id, trajectory.rollout_id, trajectory.seed, self._budget)
        key = self._endpoint.open(session)
        access = AgentAccess(self._endpoint.session_url(session_id), key)
        env = self._envs[trajectory.rollout_id % len(self._envs)]
        ref = env.run_agent.remote(trajectory.rollout_id, trajectory.row, access)
        due = time.monotonic() + self._config.trajectory_timeout_s + REPLY_GRACE_S
        self._pending[ref] = (trajectory, session, due)

    def _collect_returns(self) -> None:
        refs = list(self._pending)
        if not refs:
            return
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in done:
            trajectory, session, _ = self._pending.pop(ref)
            try:
                reply: EnvReply = ray.get(ref)
            except ray.exceptions.RayActorError:
                reply = EnvReply(lost=True)
            self._returned(trajectory, session, reply)
        now = time.monotonic()
        for ref in [ref for ref, (_, _, due) in self._pending.items() if due <= now]:
            trajectory, session, _ = self._pending.pop(ref)
            ray.cancel(ref)
            self._returned(trajectory, session, EnvReply(timed_out=True))

    def _returned(self, trajectory: Trajectory, session: AgentSession, reply: EnvReply) -> None:
        self._endpoint.close(session.session_id)
        if reply.lost and trajectory.restarts < MAX_ENV_RESTARTS:
            logger.warning(
                "rollout %d: its environment actor died; its agent starts again",
                trajectory.rollout_id,
            )
            trajectory.start_again()
            self._launch(trajectory)
            return
        trajectory.step_seconds.append(round(reply.seconds, 6))
        if reply.error is not None and session.over_budget and session.calls:
            self._record(trajectory, session, EnvReply(info={"error": reply.error}))
            trajectory.finish_reason = "length"
        elif reply.timed_out:
            self._drop(trajectory, "agent_timeout", "ran past env.trajectory_timeout_s")
        elif reply.lost or reply.error is not None:
            self._drop(trajectory, "agent_error", reply.error or "its environment actor died")
        elif not session.calls:
            self._drop(trajectory, "agent_no_calls", "the agent never called the endpoint")
        else:
            self._record(trajectory, session, reply)

    def _record(self, trajectory: Trajectory, session: AgentSession, reply: EnvReply) -> None:
        left_out = fill_trajectory(trajectory, session.calls)
        trajectory.counters["agent_calls"] += len(session.calls)
        trajectory.counters["split_calls"] += left_out
        trajectory.turn_rewards[-1] += reply.reward
        trajectory.info.update(reply.info)

    def _drop(self, trajectory: Trajectory, reason: str, why: str) -> None:
        """Keeps the row, untrained: the dataset prompt and its first id as an observation."""
        logger.warning("rollout %d: dropped: %s", trajectory.rollout_id, why)
        trajectory.prompt_ids = list(trajectory.dataset_prompt_ids[:-1])
        trajectory.append(trajectory.dataset_prompt_ids[-1:], version=self._version())
        trajectory.finish_reason = reason
        trajectory.info["error"] = why

    # -- requests ---------------------------------------------------------------------------------

    def _submit(self, request: EndpointRequest) -> None:
        if request.session.closed:
            request.future.set_exception(SessionEnded())
            return
        key = f"agent:{next(self._keys)}"
        self._requests[key] = _Request(request, request.params.max_new_tokens)
        self._engine.submit(key, request.prompt_ids, request.params)

    def _sampled(self, key: str, completion: Completion) -> None:
        pending = self._requests.pop(key)
        choice = Choice(
            pending.ids + list(completion.token_ids),
            pending.logprobs + list(completion.logprobs),
            pending.versions + [self._version()] * len(completion.token_ids),
            completion.finish_reason,
        )
        if not pending.request.future.done():
            pending.request.future.set_result(choice)
