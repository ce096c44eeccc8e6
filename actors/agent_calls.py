"""An agent trajectory's calls to the endpoint, recorded as tokens, and the sample they make.

Each call of a session (one trajectory, actors/endpoint.py) is kept as the prompt ids the
engine was given and, per choice, the ids it sampled with their logprobs and policy versions.
The agent only ever sees text; the tokens are these.

**Prompts extend the record.** A chat request whose messages are the previous call's messages,
then the answer the endpoint gave (any of its choices), then new messages, is not rendered
afresh: its prompt is the previous prompt, the sampled ids, the template's closing of that turn
and the new messages' ids as the chat template's delta (actors/turns.py), so the engine sees
exactly what it sampled. Any other request (an agent that rewrote its history, changed its
tools, or started a new conversation) is rendered afresh and *splits* the trajectory.

**The sample** (``fill_trajectory``): calls whose prompts extend the previous call's prompt and
completion token for token form a chain, trained as one sequence: the first prompt, then every
id after it, sampled ids with loss mask 1 and the ids between them (tool results, user turns)
with mask 0. A trajectory that split is trained on its last chain (the one that ends with the
agent's final answer); the calls of its earlier chains are counted (``split_calls``) and left
out, since a row of the batch is one sequence.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

from rlfleet.actors.rollout import Trajectory
from rlfleet.actors.turns import TurnTokens

Message = dict[str, Any]


class BudgetError(ValueError):
    """A request over the trajectory's token budget (the endpoint answers 400 with it)."""


@dataclass
class Choice:
    token_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: str
    message: Message | None = None
    """The assistant message the endpoint answered with (chat calls)."""


@dataclass
class Call:
    prompt_ids: list[int]
    choices: list[Choice]
    messages: list[Message] | None = None
    tools_key: str = ""


@dataclass(frozen=True)
class Budget:
    """A trajectory's token limits: ``max_total_tokens`` after its first prompt (the
    ``env.max_total_tokens`` of the config), ``per_call`` sampled tokens at most per call, and
    the model's ``context``."""

    max_total_tokens: int
    per_call: int
    context: int


@dataclass
class AgentSession:
    """One trajectory's session: its calls, kept thread-safe (the endpoint's handlers add to
    it; the generator reads it once the agent returned)."""

    session_id: str
    rollout_id: int
    seed: int
    budget: Budget
    calls: list[Call] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False
    over_budget: bool = False
    """A request was refused for the token budget: the trajectory is at its length limit."""
    issued: int = 0
    """Calls started so far: the next one's index, which its sampling seed derives from."""

    def next_call(self) -> int:
        with self.lock:
            self.issued += 1
            return self.issued - 1

    def chat_prompt(
        self, messages: list[Message], tools: list[dict] | None, turns: TurnTokens
    ) -> list[int]:
        """The prompt ids of a chat request: the record extended (see the module's
        docstring), else the messages rendered afresh."""
        key = tools_key(tools)
        with self.lock:
            for call in reversed(self.calls):
                if call.messages is None or call.tools_key != key:
                    continue
                extended = _extension(call, messages, turns)
                if extended is not None:
                    return extended
        return turns.prompt_ids(messages)

    def max_tokens(self, prompt_ids: list[int], requested: int | None) -> int:
        """The sampling budget of one call, or a ``BudgetError`` naming the limit it is over."""
        first = self.calls[0].prompt_ids if self.calls else prompt_ids
        used = max(len(prompt_ids) - len(first), 0)
        left = min(self.budget.max_total_tokens - used, self.budget.context - len(prompt_ids))
        if requested is not None and requested > left:
            self.over_budget = True
            raise BudgetError(
                f"max_tokens {requested} is over what is left of this trajectory's budget "
                f"({left} tokens: env.max_total_tokens {self.budget.max_total_tokens} after the "
                f"first prompt, context {self.budget.context})"
            )
        if left <= 0:
            self.over_budget = True
            raise BudgetError(
                f"the prompt ({len(prompt_ids)} tokens) leaves nothing of this trajectory's "
                f"budget (env.max_total_tokens {self.budget.max_total_tokens} after the first "
                f"prompt, context {self.budget.context})"
            )
        return min(requested or self.budget.per_call, self.budget.per_call, left)

    def record(self, call: Call) -> int:
        """Adds a finished call; returns its index."""
        with self.lock:
            self.calls.append(call)
            return len(self.calls) - 1


def tools_key(tools: list[dict] | None) -> str:
    return json.dumps(tools or [], sort_keys=True)


def _extension(call: Call, messages: list[Message], turns: TurnTokens) -> list[int] | None:
    """``call``'s prompt and sampled ids extended by the messages after its answer, when
    ``messages`` are its messages, one of its answers, then at least one more."""
    before = call.messages or []
    if len(messages) <= len(before) + 1:
        return None
    if [_comparable(m) for m in messages[: len(before)]] != [_comparable(m) for m in before]:
        return None
    answer = _comparable(messages[len(before)])
    for choice in call.choices:
        if choice.message is not None and _comparable(choice.message) == answer:
            sampled = call.prompt_ids + choice.token_ids
            new = messages[len(before) + 1 :]
            return sampled + turns.closing_ids(choice.token_ids) + turns.observation_ids(new)
    return None


def _comparable(message: Message) -> tuple:
    """What of a message the chat template renders: role, content, tool calls (name and
    arguments as parsed JSON), tool call id. A client's own fields (``refusal: None`` ...) and
    the JSON spacing of arguments do not count."""
    calls = []
    for tool_call in message.get("tool_calls") or []:
        function = tool_call.get("function") or {}
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                pass
        calls.append((function.get("name"), json.dumps(arguments, sort_keys=True)))
    content = message.get("content")
    if isinstance(content, list):  # content parts: the text parts, joined
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return (message.get("role"), content or "", tuple(calls), message.get("tool_call_id"))


def chains(calls: list[Call]) -> list[list[tuple[Call, Choice]]]:
    """The calls as chains: a call joins the chain before it when its prompt starts with that
    chain's last prompt and one of its choices' ids, token for token."""
    found: list[list[tuple[Call, Choice]]] = []
    for call in calls:
        chain = found[-1] if found else None
        continued = None
        if chain is not None:
            last_call, _ = chain[-1]
            for choice in last_call.choices:
                ids = last_call.prompt_ids + choice.token_ids
                if call.prompt_ids[: len(ids)] == ids:
                    continued = choice
                    break
        if continued is None:
            found.append([(call, call.choices[0])])
        else:
            chain[-1] = (chain[-1][0], continued)
            chain.append((call, call.choices[0]))
    return found


def fill_trajectory(trajectory: Trajectory, calls: list[Call]) -> int:
    """Writes the last chain of ``calls`` into ``trajectory`` (its prompt, ids, logprobs, loss
    mask, turns); returns how many calls were left out (earlier chains)."""
    found = chains(calls)
    if not found:
        return 0
    chain = found[-1]
    first, _ = chain[0]
    trajectory.prompt_ids = list(first.prompt_ids)
    for call, choice in chain:
        gap = call.prompt_ids[len(trajectory.prompt_ids) + len(trajectory.response_ids) :]
        trajectory.append(list(gap), version=trajectory.versions[-1] if trajectory.versions else 0)
        trajectory.response_ids += choice.token_ids
        trajectory.logprobs += choice.logprobs
        trajectory.loss_mask += [1] * len(choice.token_ids)
        trajectory.versions += choice.versions
        trajectory.turn_ends.append(len(trajectory.response_ids) - 1)
        trajectory.turn_rewards.append(0.0)
    trajectory.finish_reason = chain[-1][1].finish_reason
    return sum(len(c) for c in found[:-1])
