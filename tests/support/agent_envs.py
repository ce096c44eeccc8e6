"""A tool-using environment for tests that need every multi-turn counter to move (the dashboard's
agent panels): its tool calls, tool errors and malformed calls are set per turn, not read from
the (random) model's text, so they are the same in every run. Imported by environment actors
(their runtime env puts tests/ on PYTHONPATH)."""

from __future__ import annotations

import asyncio
from typing import Any

from rlfleet.envs.protocol import Step

TOOL = "lookup"


def observation(turn: int) -> str:
    """What ``LookupToolEnv`` answers after turn ``turn`` (1-based): the tool's result, an error
    every second turn."""
    return f" {TOOL} {turn}: {'error' if failed(turn) else 'ok'}"


def failed(turn: int) -> bool:
    return turn % 2 == 0


class LookupToolEnv:
    """Every turn is one call of the tool ``lookup`` (``info["tool_calls"]``), which fails every
    second turn (``info["tool_errors"]``); turn 1 also counts one malformed call. Done after
    ``turns`` turns. A trajectory whose seed is a multiple of ``hang_every`` (0: none) sleeps
    ``hang_s`` in its first step (``async``: cancelled at the step deadline)."""

    def __init__(self, turns: int = 3, hang_every: int = 0, hang_s: float = 60.0) -> None:
        self.turns, self.hang_every, self.hang_s = turns, hang_every, hang_s

    def reset(self, row: dict[str, Any], seed: int) -> None:
        self.turn = 0
        self.hangs = bool(self.hang_every) and seed % self.hang_every == 0

    async def step(self, action: str) -> Step:
        self.turn += 1
        if self.hangs and self.turn == 1:
            await asyncio.sleep(self.hang_s)
        done = self.turn >= self.turns
        return Step(
            observation=None if done else observation(self.turn),
            reward=0.0 if failed(self.turn) else 0.5,
            done=done,
            info={
                "tool_calls": {TOOL: 1},
                "tool_errors": {TOOL: int(failed(self.turn))},
                "malformed_tool_calls": int(self.turn == 1),
            },
        )
