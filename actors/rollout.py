"""The multi-turn rollout loop: a generator's trajectories against environment actors.

Each trajectory alternates turns: the engine samples until a stop (end of turn, end of a tool
call, the turn's token budget); the trajectory's environment (in environment actor
``rollout_id % len(envs)``, envs/actor.py) steps on the turn's text; the observation's ids are
appended (loss mask 0) and the next turn is sampled, until the environment says done, or
``env.max_turns``, or ``env.max_total_tokens``. Many trajectories are in flight at once and each
moves on its own: a turn goes to the engine as soon as its observation is back (request-level
submission, ``RequestEngine``) while slower environments are still stepping, so one slow
environment does not hold the batch.

Token-in/token-out: sampled ids and their logprobs are kept exactly as the engine gave them;
only the environment's observations are tokenized (actors/turns.py). A turn's seed derives from
the rollout's seed and the turn's index, so a trajectory started again (its environment actor
died: Ray restarts it empty) samples what it sampled before.

Every environment call has a deadline (``env.step_timeout_s``, enforced in the environment
actor, plus ``REPLY_GRACE_S`` here for an actor that cannot answer at all): a trajectory past it
ends with finish reason ``env_timeout``. A raising environment ends its trajectory
(``env_error``) or, with ``env.on_error: fail``, the shard, with one line naming the environment,
the trajectory and the turn.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import ray

from rlfleet.actors.engine import Completion, RequestEngine, SamplingSpec
from rlfleet.actors.turns import TurnTokens
from rlfleet.common.env_config import EnvConfig
from rlfleet.envs.actor import EnvReply

logger = logging.getLogger(__name__)

REPLY_GRACE_S = 10.0
"""How long past ``env.step_timeout_s`` the loop waits for an environment actor's reply (the
actor enforces the deadline itself; one that cannot answer at all is stopped or gone)."""

REPLY_CHECK_S = 0.01
"""While the engine samples, environment replies are looked for at most this often: a look
(``ray.wait``) costs 1.5-2 ms, about a tenth of a decoding step of 64 sequences of a 4 x 256
GPT-2 on 2 cores (bench/multiturn.py)."""

MAX_ENV_RESTARTS = 3
"""How often one trajectory starts again from turn 0 after its environment actor died."""


class EnvFailed(RuntimeError):
    """An environment raised and ``env.on_error`` is ``fail``."""


def turn_seed(seed: int, turn: int) -> int:
    """The sampling seed of a trajectory's turn: 32 bits of a hash of its seed and the turn."""
    digest = hashlib.blake2b(f"{seed}:{turn}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


@dataclass
class Trajectory:
    """One trajectory's state and record: everything after the prompt in ``response_ids``."""

    rollout_id: int
    seed: int
    row: dict[str, Any]
    dataset_prompt_ids: list[int]
    prompt_ids: list[int] = field(default_factory=list)
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    turn_ends: list[int] = field(default_factory=list)
    turn_rewards: list[float] = field(default_factory=list)
    messages: list[dict[str, Any]] | None = None
    """The conversation as messages (chat prompts), for the re-rendering check."""
    finish_reason: str | None = None
    ending: str | None = None
    """Why the trajectory ends after the turn being sampled (its environment failed before
    the first turn: that turn is sampled from the dataset's prompt, without the
    environment)."""
    info: dict[str, Any] = field(default_factory=dict)
    counters: Counter = field(default_factory=Counter)
    tool_calls: Counter = field(default_factory=Counter)
    tool_errors: Counter = field(default_factory=Counter)
    step_seconds: list[float] = field(default_factory=list)
    restarts: int = 0
    versions: list[int] = field(default_factory=list)
    """The policy version that sampled each token of ``response_ids`` (an observation token:
    the version of the turn before it)."""
    turn_start: int = 0
    """Where the turn being sampled starts in ``response_ids`` (a turn continued after new
    weights arrived has tokens from two versions)."""

    @property
    def turns(self) -> int:
        return len(self.turn_ends)

    def start_again(self) -> None:
        """Back to before turn 0 (its environment actor died), keeping the restart count."""
        restarts = self.restarts + 1
        self.__init__(self.rollout_id, self.seed, self.row, self.dataset_prompt_ids)
        self.restarts = restarts

    def append(self, ids: list[int], logprobs: list[float] | None = None, version: int = 0) -> None:
        """Sampled ids (with their logprobs: loss mask 1) or observation ids (mask 0)."""
        self.response_ids += ids
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)
        self.loss_mask += [1 if logprobs is not None else 0] * len(ids)
        self.versions += [version] * len(ids)

    def env_info(self) -> str:
        return json.dumps(
            {
                **self.info,
                "tool_calls": dict(self.tool_calls),
                "tool_errors": dict(self.tool_errors),
                "step_seconds": self.step_seconds,
                "restarts": self.restarts,
                **self.counters,
            },
            default=str,
        )


def single_turn(sampling: SamplingSpec) -> EnvConfig:
    """The loop's settings for plain rollouts (no environment): one turn of at most
    ``max_new_tokens``."""
    return EnvConfig(environment="(none)", max_turns=1, max_total_tokens=sampling.max_new_tokens)


class MultiTurnRollout:
    """Runs the trajectories of one prompt batch to the end (``run``). Without ``envs`` each
    trajectory is one turn from its dataset prompt (asynchronous mode samples plain rollouts
    this way, so that new weights can arrive mid-request).

    ``between_steps(loop)``, when given, runs between two engine steps: where a generator loads
    new weights (``interrupt`` and ``resume`` continue the requests in flight under them);
    ``version()`` is the policy version sampling now."""

    def __init__(
        self,
        engine: RequestEngine,
        turns: TurnTokens,
        envs: list[Any] | None,
        config: EnvConfig | None,
        sampling: SamplingSpec,
        context: int,
        between_steps: Callable[[MultiTurnRollout], None] | None = None,
        version: Callable[[], int] = lambda: 0,
    ) -> None:
        self._engine = engine
        self._turns = turns
        self._envs = envs or []
        self._config = config or single_turn(sampling)
        self._sampling = sampling
        self._context = context
        self._between_steps = between_steps
        self._version = version
        self._budgets: dict[str, int] = {}
        """Each request's token budget, by key (what is left of it after an interruption)."""
        self._pending: dict[Any, tuple[Trajectory, str, float]] = {}
        """Environment calls in flight: ref -> (trajectory, ``reset``/``step``, due)."""
        self._sampling_now: dict[str, Trajectory] = {}

    def run(self, trajectories: list[Trajectory]) -> list[Trajectory]:
        """Every trajectory to its end; returns them in the order given."""
        for trajectory in trajectories:
            self._reset(trajectory)
        checked = 0.0
        while self._pending or self._engine.busy():
            if self._between_steps is not None:
                self._between_steps(self)
            busy = self._engine.busy()
            if busy:
                for key, completion in self._engine.poll():
                    self._budgets.pop(key, None)
                    self._turn_sampled(self._sampling_now.pop(key), completion)
            if not busy or time.monotonic() - checked >= REPLY_CHECK_S:
                checked = time.monotonic()
                self._collect_replies(wait_s=0.0 if self._engine.busy() else 0.05)
        return trajectories

    def interrupt(self) -> list[tuple[Trajectory, int]]:
        """Stops every request in flight at the token it reached, keeping its tokens (sampled
        by the policy now held); returns each trajectory with the budget left of its turn, for
        ``resume`` once new weights are loaded."""
        stopped = []
        for key, partial in self._engine.interrupt():
            trajectory = self._sampling_now.pop(key)
            trajectory.append(list(partial.token_ids), list(partial.logprobs), self._version())
            stopped.append((trajectory, self._budgets.pop(key) - len(partial.token_ids)))
        return stopped

    def resume(self, stopped: list[tuple[Trajectory, int]]) -> None:
        """Continues each interrupted turn from its prefix under the policy now held."""
        for trajectory, left in stopped:
            if left <= 0:
                completion = Completion([], [], "length")
                self._turn_sampled(trajectory, completion)
            else:
                self._submit(trajectory, left)

    # -- environment calls ------------------------------------------------------------------------

    def _env_of(self, trajectory: Trajectory) -> Any:
        return self._envs[trajectory.rollout_id % len(self._envs)]

    def _reset(self, trajectory: Trajectory) -> None:
        if not self._envs:
            self._start(trajectory, None)
            return
        ref = self._env_of(trajectory).reset.remote(
            trajectory.rollout_id, trajectory.row, trajectory.seed
        )
        self._expect(ref, trajectory, "reset")

    def _step(self, trajectory: Trajectory, action: str) -> None:
        ref = self._env_of(trajectory).step.remote(trajectory.rollout_id, trajectory.turns, action)
        self._expect(ref, trajectory, "step")

    def _expect(self, ref: Any, trajectory: Trajectory, what: str) -> None:
        due = time.monotonic() + self._config.step_timeout_s + REPLY_GRACE_S
        self._pending[ref] = (trajectory, what, due)

    def _collect_replies(self, wait_s: float) -> None:
        """The environment replies that are back: waits up to ``wait_s`` for the first (the
        engine is idle), then takes every other one that is back too."""
        refs = list(self._pending)
        if not refs:
            return
        done, _ = ray.wait(refs, num_returns=1, timeout=wait_s)
        if done:
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in done:
            trajectory, what, _ = self._pending.pop(ref)
            try:
                reply: EnvReply = ray.get(ref)
            except ray.exceptions.RayActorError:
                self._env_lost(trajectory)
                continue
            self._on_reply(trajectory, what, reply)
        now = time.monotonic()
        for ref in [ref for ref, (_, _, due) in self._pending.items() if due <= now]:
            trajectory, _, _ = self._pending.pop(ref)
            self._finish(trajectory, "env_timeout")

    def _env_lost(self, trajectory: Trajectory) -> None:
        """Its environment actor died: start it again from turn 0 (Ray restarts the actor)."""
        if trajectory.restarts >= MAX_ENV_RESTARTS:
            self._finish(trajectory, "env_error")
            return
        logger.warning(
            "rollout %d: its environment actor died; starting it again from turn 0",
            trajectory.rollout_id,
        )
        trajectory.start_again()
        self._reset(trajectory)

    def _on_reply(self, trajectory: Trajectory, what: str, reply: EnvReply) -> None:
        trajectory.step_seconds.append(round(reply.seconds, 6))
        if reply.timed_out:
            self._finish(trajectory, "env_timeout")
        elif reply.lost:
            self._env_lost(trajectory)
        elif reply.error is not None:
            if self._config.on_error == "fail":
                raise EnvFailed(reply.error)
            logger.warning("%s: the trajectory ends", reply.error)
            trajectory.info["error"] = reply.error
            self._finish(trajectory, "env_error")
        elif what == "reset":
            self._start(trajectory, reply.observation)
        else:
            self._stepped(trajectory, reply)

    # -- turns ------------------------------------------------------------------------------------

    def _start(self, trajectory: Trajectory, observation: Any) -> None:
        """The first prompt: the environment's, else the dataset row's."""
        if observation is None or observation == [] or observation == "":
            trajectory.prompt_ids = list(trajectory.dataset_prompt_ids)
            if self._turns.chat and isinstance(trajectory.row.get("messages"), list):
                trajectory.messages = list(trajectory.row["messages"])
        elif isinstance(observation, str):
            trajectory.prompt_ids = self._turns.encode(observation)
        else:
            trajectory.messages = list(observation)
            trajectory.prompt_ids = self._turns.prompt_ids(trajectory.messages)
        self._sample_turn(trajectory)

    def _sample_turn(self, trajectory: Trajectory) -> None:
        left = self._config.max_total_tokens - len(trajectory.response_ids)
        room = self._context - len(trajectory.prompt_ids) - len(trajectory.response_ids)
        per_turn = self._config.max_tokens_per_turn or self._sampling.max_new_tokens
        budget = min(per_turn, left, room)
        if budget <= 0:
            self._finish(trajectory, "length")
            return
        trajectory.turn_start = len(trajectory.response_ids)
        self._submit(trajectory, budget)

    def _submit(self, trajectory: Trajectory, budget: int) -> None:
        """Samples (the rest of) the trajectory's turn: at most ``budget`` tokens."""
        part = len(trajectory.response_ids) - trajectory.turn_start
        key = f"{trajectory.rollout_id}:{trajectory.restarts}:{trajectory.turns}:{part}"
        params = replace(
            self._sampling,
            max_new_tokens=budget,
            seeds=(turn_seed(trajectory.seed, trajectory.turns),),
        )
        self._sampling_now[key] = trajectory
        self._budgets[key] = budget
        self._engine.submit(key, trajectory.prompt_ids + trajectory.response_ids, params)

    def _turn_sampled(self, trajectory: Trajectory, completion: Completion) -> None:
        trajectory.append(list(completion.token_ids), list(completion.logprobs), self._version())
        trajectory.turn_ends.append(len(trajectory.response_ids) - 1)
        trajectory.turn_rewards.append(0.0)
        if trajectory.ending is not None:
            trajectory.finish_reason = trajectory.ending
            return
        turn = trajectory.response_ids[trajectory.turn_start :]
        if not self._envs:
            trajectory.finish_reason = completion.finish_reason
            return
        stops = self._sampling.stop_token_ids
        text = self._turns.turn_text(turn, completion.finish_reason, stops)
        if trajectory.messages is not None:
            trajectory.messages.append({"role": "assistant", "content": text})
        self._step(trajectory, text)

    def _stepped(self, trajectory: Trajectory, reply: EnvReply) -> None:
        trajectory.turn_rewards[-1] += reply.reward
        self._count(trajectory, reply.info)
        if reply.done:
            self._finish(trajectory, "stop")
            return
        if trajectory.turns >= self._config.max_turns:
            self._finish(trajectory, "max_turns")
            return
        if not self._append_observation(trajectory, reply.observation):
            self._finish(trajectory, "length")
            return
        self._sample_turn(trajectory)

    def _append_observation(self, trajectory: Trajectory, observation: Any) -> bool:
        """Appends the closing of the last turn and the observation's ids; False when they do
        not fit the token budget (what fits is kept, and the cut is counted)."""
        ids = self._turns.closing_ids(trajectory.response_ids)
        if observation:
            ids += self._turns.observation_ids(observation)
            if trajectory.messages is not None and isinstance(observation, list):
                trajectory.messages += observation
        left = min(
            self._config.max_total_tokens - len(trajectory.response_ids),
            self._context - len(trajectory.prompt_ids) - len(trajectory.response_ids),
        )
        if len(ids) >= left:
            trajectory.counters["truncated_observations"] += 1
            trajectory.append(ids[: max(left, 0)], version=self._version())
            return False
        trajectory.append(ids, version=self._version())
        self._check_rerender(trajectory)
        return True

    def _check_rerender(self, trajectory: Trajectory) -> None:
        if trajectory.messages is None or not isinstance(trajectory.messages[-1], dict):
            return
        ids = trajectory.prompt_ids + trajectory.response_ids
        if not self._turns.rerender_matches(trajectory.messages, ids):
            trajectory.counters["rerender_mismatches"] += 1

    def _count(self, trajectory: Trajectory, info: dict[str, Any]) -> None:
        """Keeps the environment's info; sums its tool counters over the turns."""
        for key, counter in (
            ("tool_calls", trajectory.tool_calls),
            ("tool_errors", trajectory.tool_errors),
        ):
            counter.update(info.get(key) or {})
        trajectory.counters["malformed_tool_calls"] += int(info.get("malformed_tool_calls", 0))
        trajectory.info.update(
            {
                k: v
                for k, v in info.items()
                if k not in ("tool_calls", "tool_errors", "malformed_tool_calls")
            }
        )

    def _finish(self, trajectory: Trajectory, reason: str) -> None:
        """Ends the trajectory; one that failed before its first turn still samples that turn
        from the dataset's prompt (every row of the batch is trained on: tokens the model
        sampled, scored as the reward says)."""
        if not trajectory.response_ids and trajectory.ending is None and self._envs:
            trajectory.ending = reason
            self._start(trajectory, None)
            return
        trajectory.finish_reason = reason
        if reason in ("max_turns", "length") and self._envs:
            self._env_of(trajectory).close.remote(trajectory.rollout_id)
