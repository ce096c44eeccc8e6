"""Environments for the multi-turn tests (imported by environment actors: their runtime env puts
tests/ on PYTHONPATH)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from rlfleet.envs.protocol import Step


def observation(turn: int) -> str:
    """The text ``CountingEnv`` answers after turn ``turn`` (1-based)."""
    return f" then {turn} more"


class CountingEnv:
    """Text prompts; after each turn the observation ``observation(turn)``, reward 0.25 a turn,
    done after ``turns`` turns (the row's ``turns``, else 3). ``sleep_s`` (kwargs) per step; a
    row with ``hang_at`` hangs at that turn (with ``hang_every`` n, so do the trajectories whose
    seed is a multiple of n, at turn 2); a row with ``raise_at`` raises there; a row's ``repeat``
    repeats each observation that often."""

    def __init__(self, sleep_s: float = 0.0, hang_every: int = 0) -> None:
        self.sleep_s, self.hang_every = sleep_s, hang_every

    def reset(self, row: dict[str, Any], seed: int) -> None:
        self.row, self.turn = dict(row), 0
        if self.hang_every and seed % self.hang_every == 0:
            self.row["hang_at"] = 2
        if self.row.get("raise_at") == 0:
            raise ValueError("no such puzzle")

    def step(self, action: str) -> Step:
        self.turn += 1
        if self.sleep_s:
            time.sleep(self.sleep_s)
        if self.row.get("hang_at") == self.turn:
            time.sleep(3600)
        if self.row.get("raise_at") == self.turn:
            raise RuntimeError(f"broken at turn {self.turn}")
        done = self.turn >= self.row.get("turns", 3)
        text = observation(self.turn) * self.row.get("repeat", 1)
        return Step(
            observation=None if done else text,
            reward=0.25,
            done=done,
            info={"pid": os.getpid()},
        )


class AsyncCountingEnv(CountingEnv):
    """``CountingEnv`` with ``async`` methods (sleeping on the event loop)."""

    async def reset(self, row: dict[str, Any], seed: int) -> None:  # type: ignore[override]
        super().reset(row, seed)

    async def step(self, action: str) -> Step:  # type: ignore[override]
        if self.sleep_s:
            await asyncio.sleep(self.sleep_s)
        sleep, self.sleep_s = self.sleep_s, 0.0
        try:
            return super().step(action)
        finally:
            self.sleep_s = sleep
