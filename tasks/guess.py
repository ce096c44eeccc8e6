"""Guess-the-number, the multi-turn demo: the model guesses, the environment says higher or lower.

``GuessEnv`` (``env.environment: rlfleet.tasks.guess:GuessEnv``) picks a secret in
``1..max_number`` (16 by default) from the trajectory's seed, or takes the row's ``secret``
(the eval rows name each one, so the eval mean is exact), and answers every guess with
``"higher"`` or ``"lower"`` as a user message until the model guesses it or runs out of turns.
A win earns ``1 - turn_cost * (turns - 1)``, so fewer turns earn more.

The tiny model's pretraining corpus (``conversations``) plays three ways, chosen per game:
scanning up from 1 (about 8.5 turns on average), guessing at random among the numbers the hints
still allow (about 4.6) and bisecting (about 3.4). Its first guess tells them apart (1, anything,
8), so RL can cut the mean turns by making the first guess 8 and letting the rest follow.

``examples/agent_guess_prompts.jsonl`` and ``..._eval.jsonl`` are ``write_prompts``'s output
(``python -m rlfleet.tasks.guess examples/agent_guess_prompts.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlfleet.envs.protocol import Message, Step

MAX_NUMBER = 16
MAX_TURNS = 16
TURN_COST = 0.05
STRATEGY_WEIGHTS = {"scan": 0.4, "random": 0.4, "bisect": 0.2}
"""How often each way of playing appears in the pretraining corpus."""
_INTEGER = re.compile(r"-?\d+")


def intro(max_number: int = MAX_NUMBER) -> list[Message]:
    """The game's opening: the only message of a prompt row."""
    return [
        {
            "role": "user",
            "content": f"I picked a number from 1 to {max_number}. Guess it!",
        }
    ]


def hint(guess: int, secret: int) -> str:
    return "higher" if guess < secret else "lower"


class GuessEnv:
    """One game per trajectory, as ``rlfleet.envs.protocol`` defines an environment.

    ``info`` carries ``turns`` (guesses so far) and ``solved``; a turn without a number gets a
    reminder and counts as a turn, so rambling costs as much as a wrong guess. A game not won
    within ``max_turns`` ends with reward 0."""

    def __init__(
        self, max_number: int = MAX_NUMBER, max_turns: int = MAX_TURNS, turn_cost: float = TURN_COST
    ) -> None:
        if max_number < 2 or max_turns < 1 or not 0 <= turn_cost * (max_turns - 1) < 1:
            raise ValueError(
                "need max_number >= 2, max_turns >= 1 and turn_cost * (max_turns - 1) in [0, 1) "
                f"(a win always earns more than a loss), "
                f"got {max_number}, {max_turns}, {turn_cost}"
            )
        self.max_number = max_number
        self.max_turns = max_turns
        self.turn_cost = turn_cost
        self.secret = 0
        self.turns = 0

    def reset(self, row: dict[str, Any], seed: int) -> list[Message]:
        secret = row.get("secret")
        self.secret = int(secret) if secret else random.Random(seed).randint(1, self.max_number)
        self.turns = 0
        return intro(self.max_number)

    def step(self, action: str) -> Step:
        self.turns += 1
        match = _INTEGER.search(action)
        guess = None if match is None else int(match.group(0))
        info = {"turns": self.turns, "solved": guess == self.secret}
        if guess == self.secret:
            reward = 1.0 - self.turn_cost * (self.turns - 1)
            return Step(reward=reward, done=True, info=info)
        if self.turns >= self.max_turns:
            return Step(done=True, info=info)
        text = hint(guess, self.secret) if guess is not None else "Guess a number."
        return Step(observation=[{"role": "user", "content": text}], info=info)


Strategy = Callable[[int, int, list[int], random.Random], int]
"""``(low, high, earlier guesses, rng) -> guess``: ``low..high`` is what the hints still allow."""


def _scan(low: int, high: int, guesses: list[int], rng: random.Random) -> int:
    return guesses[-1] + 1 if guesses else 1


def _random(low: int, high: int, guesses: list[int], rng: random.Random) -> int:
    return rng.randint(low, high)


def _bisect(low: int, high: int, guesses: list[int], rng: random.Random) -> int:
    return (low + high) // 2


STRATEGIES: dict[str, Strategy] = {"scan": _scan, "random": _random, "bisect": _bisect}


def play(secret: int, strategy: Strategy, rng: random.Random, max_number: int) -> list[int]:
    """The guesses of one game played by ``strategy`` until it finds ``secret``."""
    low, high, guesses = 1, max_number, []
    while not guesses or guesses[-1] != secret:
        guess = strategy(low, high, guesses, rng)
        guesses.append(guess)
        if guess < secret:
            low = max(low, guess + 1)
        elif guess > secret:
            high = min(high, guess - 1)
    return guesses


def dialogue(secret: int, guesses: list[int], max_number: int) -> list[Message]:
    """The game as chat messages: the intro, then each guess and its hint, ending on the win."""
    messages = intro(max_number)
    for guess in guesses:
        messages.append({"role": "assistant", "content": str(guess)})
        if guess != secret:
            messages.append({"role": "user", "content": hint(guess, secret)})
    return messages


def conversations(n: int, *, seed: int = 0, max_number: int = MAX_NUMBER) -> list[list[Message]]:
    """``n`` pretraining games, strategies drawn by ``STRATEGY_WEIGHTS``, seeded."""
    rng = random.Random(seed)
    names, weights = zip(*STRATEGY_WEIGHTS.items(), strict=True)
    games = []
    for _ in range(n):
        secret = rng.randint(1, max_number)
        strategy = STRATEGIES[rng.choices(names, weights)[0]]
        games.append(dialogue(secret, play(secret, strategy, rng, max_number), max_number))
    return games


def mean_turns(strategy: str, max_number: int = MAX_NUMBER, games: int = 4000) -> float:
    """A strategy's mean turns to solve over uniformly drawn secrets (the corpus' yardstick)."""
    rng = random.Random(0)
    total = 0
    for _ in range(games):
        secret = rng.randint(1, max_number)
        total += len(play(secret, STRATEGIES[strategy], rng, max_number))
    return total / games


def write_prompts(
    path: str | Path, n: int = 512, max_number: int = MAX_NUMBER
) -> tuple[Path, Path]:
    """``n`` training rows (the intro only: the secret comes from each trajectory's seed) at
    ``path``, and beside it (``<stem>_eval.jsonl``) one eval row per secret."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    train = [{"messages": intro(max_number), "game": i} for i in range(n)]
    held_out = [{"messages": intro(max_number), "secret": s} for s in range(1, max_number + 1)]
    eval_file = path.with_name(f"{path.stem}_eval{path.suffix}")
    for rows, file in ((train, path), (held_out, eval_file)):
        file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path, eval_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="write the guessing game's prompt files")
    parser.add_argument("path", type=Path, help="the training prompts (JSONL); eval beside it")
    parser.add_argument("--n", type=int, default=512, help="training rows")
    args = parser.parse_args(argv)
    for path in write_prompts(args.path, args.n):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
