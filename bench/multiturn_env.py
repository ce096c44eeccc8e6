"""The environment of bench/multiturn.py, in a module of its own so that the environment actors
import only this (``rlfleet.bench.multiturn_env:SleepingEnv``), not the benchmark's engine and
Ray imports."""

from __future__ import annotations

import random
import time
from typing import Any

from rlfleet.envs.protocol import Step


class SleepingEnv:
    """A fixed number of turns, each step a plain blocking sleep (an environment doing I/O or a
    subprocess in the actor's worker thread), then a short text observation.

    The row says ``turns`` and ``sleep_s`` as ``[low, high]``: each step sleeps a duration
    drawn uniformly from it by a generator seeded with the trajectory's seed, so every mode of
    the benchmark sees the same durations for the same trajectory and turn."""

    def reset(self, row: dict[str, Any], seed: int) -> None:
        self.turns = int(row["turns"])
        self.low, self.high = (float(s) for s in row["sleep_s"])
        self.rng = random.Random(seed)
        self.turn = 0

    def step(self, action: str) -> Step:
        self.turn += 1
        seconds = self.rng.uniform(self.low, self.high)
        if seconds > 0:
            time.sleep(seconds)
        done = self.turn >= self.turns
        return Step(observation=None if done else f" then {self.turn} more", done=done)
