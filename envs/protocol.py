"""What a user writes to train a multi-turn agent: an environment, or a class of tools.

An **environment** has ``reset(row, seed)`` and ``step(action)``, each plain or ``async``; the
job makes one instance per trajectory (``env.environment: "module:Class"``, built with
``env.kwargs``) inside an environment actor:

- ``reset(row, seed) -> Observation | None``: ``row`` is the dataset row (a dict), ``seed`` the
  trajectory's seed (the same after any restart). It returns the first prompt: a list of chat
  messages (rendered with the tokenizer's chat template), a text (tokenized as it is), or None
  for the prompt the dataset row already gives.
- ``step(action) -> Step``: ``action`` is the text of the model's last turn. The ``Step`` says
  what the model sees next (``observation``: chat messages, usually ``tool`` or ``user`` ones,
  or text), the reward for this turn, whether the trajectory is over, and an ``info`` dict kept
  with the trajectory (JSON values).

A **tool class** (``env.tools: "module:Class"``) is shorthand for an environment: its public,
type-hinted, documented methods are the tools the model may call; their JSON schemas go to the
chat template and the model's calls are parsed from its text (envs/tools.py).

Example, a guessing game (tasks/guess.py has the one the tests train)::

    class GuessEnv:
        def reset(self, row, seed):
            self.secret = random.Random(seed).randint(1, 100)
            return [{"role": "user", "content": "Guess my number (1-100)."}]

        def step(self, action):
            guess = int(action.strip())
            if guess == self.secret:
                return Step(observation=None, reward=1.0, done=True)
            hint = "higher" if guess < self.secret else "lower"
            return Step(observation=[{"role": "user", "content": hint}])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

Message = dict[str, Any]
Observation = str | list[Message]
"""Text appended as it is tokenized, or chat messages appended through the chat template."""


@dataclass
class Step:
    """The result of one ``step``: what the model sees next and what the turn earned."""

    observation: Observation | None = None
    """None or empty: nothing to append (usual when ``done``)."""
    reward: float = 0.0
    """This turn's reward, placed on the turn's last sampled token (0: none)."""
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Environment(Protocol):
    def reset(self, row: dict[str, Any], seed: int) -> Observation | None: ...

    def step(self, action: str) -> Step: ...


REQUIRED_METHODS = ("reset", "step")
