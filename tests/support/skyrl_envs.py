"""A ``skyrl_gym`` environment written as SkyRL's users write them (``BaseTextEnv``,
``BaseTextEnvStepOutput``, ``env_config`` and ``extras``), for tests/envs/test_skyrl_gym.py.
Imported by environment actors (their runtime env puts tests/ on PYTHONPATH)."""

from __future__ import annotations

import re
from typing import Any

from skyrl_gym.envs.base_text_env import BaseTextEnv, BaseTextEnvStepOutput

NUMBER = re.compile(r"-?\d+")
NO_NUMBER = "Say a number, please."
CLOSED: list[int] = []
"""The secrets of the games closed in this process."""


def intro(max_number: int = 16) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"I picked a number from 1 to {max_number}. Guess it!"}]


def hint(action: str, secret: int) -> str:
    """What the game says to ``action`` when it is not the secret."""
    match = NUMBER.search(action)
    if match is None:
        return NO_NUMBER
    return "higher" if int(match.group(0)) < secret else "lower"


class GuessTextEnv(BaseTextEnv):
    """Guess-the-number (tasks/guess.py's game) the SkyRL way: the secret is the row's
    ``reward_spec.ground_truth``, the turn limit ``extras["max_turns"]`` (set by the generator);
    ``env_config.win_reward`` for a win, ``env_config.miss_reward`` for each other turn. The
    metadata lists the hints and rewards given so far (tests compare them with the record)."""

    def __init__(self, env_config: Any = None, extras: dict[str, Any] | None = None) -> None:
        super().__init__()
        extras = extras or {}
        assert "reward_spec" in extras, "reward_spec field is required"
        self.secret = int(extras["reward_spec"]["ground_truth"])
        self.max_turns = int(extras.get("max_turns", 4))
        self.win_reward = float(env_config.get("win_reward", 1.0))
        self.miss_reward = float(env_config.get("miss_reward", 0.0))
        self.env_config, self.extras = env_config, extras
        self.hints: list[str] = []
        self.rewards: list[float] = []
        self.solved = False

    def init(self, prompt: list[dict[str, str]]) -> tuple[list[dict[str, str]], dict[str, Any]]:
        system = {"role": "system", "content": "Answer with a number."}
        return [system, *prompt], {"secret": self.secret}

    def step(self, action: str) -> BaseTextEnvStepOutput:
        self.turns += 1
        match = NUMBER.search(action)
        solved = self.solved = match is not None and int(match.group(0)) == self.secret
        reward = self.win_reward if solved else self.miss_reward
        self.rewards.append(reward)
        done = solved or self.turns >= self.max_turns
        observations = []
        if not done:
            self.hints.append(hint(action, self.secret))
            observations = [{"role": "user", "content": self.hints[-1]}]
        return BaseTextEnvStepOutput(
            observations=observations,
            reward=reward,
            done=done,
            metadata={"hints": list(self.hints), "rewards": list(self.rewards), "env": self},
        )

    def get_metrics(self) -> dict[str, Any]:
        return {"turns": self.turns, "solved": self.solved}

    def close(self) -> None:
        CLOSED.append(self.secret)


class NoStepTextEnv(BaseTextEnv):
    """A text env that forgot ``step`` (``BaseTextEnv.step`` returns None)."""
