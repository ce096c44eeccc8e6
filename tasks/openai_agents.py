"""Agents written only with the ``openai`` package, as a user brings them (``env.agent``).

Nothing here imports rlfleet: each ``run(client, row)`` talks to whatever OpenAI-compatible
endpoint its client points at, and returns a reward. rlfleet trains them through its
generators' endpoint (actors/endpoint.py); examples/agent_openai_*.yaml are the jobs.

- ``calculator``: the calculator task (tasks/calculator.py's prompts) with a ``calculator`` tool
  passed as ``tools=``: the agent runs the model's tool calls and sends the results back until
  the model answers; reward 1 for the right answer.
- ``guess``: guess-the-number (tasks/guess.py's game, 1..16) as a chat: "higher"/"lower" after
  each guess, reward 1 - 0.05 per extra turn when found within 16 turns.
"""

from __future__ import annotations

import ast
import json
import operator
import random
import re
from typing import Any

import openai

MODEL = "policy"

CALCULATOR_TOOL = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Exact integer arithmetic.",
        "parameters": {
            "type": "object",
            "properties": {
                "expression": {
                    "type": "string",
                    "description": "Integers with + - *, e.g. 37*48",
                }
            },
            "required": ["expression"],
        },
    },
}
MAX_CALCULATOR_CALLS = 3
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
_INTEGER = re.compile(r"-?\d+")


def evaluate(expression: str) -> str:
    """``+ - *`` of integers, exactly; an ``error: ...`` text for anything else."""

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        raise ValueError("only integers and + - * are allowed")

    if len(expression) > 64:
        return "error: expression too long"
    try:
        return str(value(ast.parse(expression, mode="eval").body))
    except (SyntaxError, ValueError) as exc:
        return f"error: {exc}"


def final_answer(text: str | None) -> int | None:
    numbers = _INTEGER.findall(text or "")
    return int(numbers[-1]) if numbers else None


async def calculator(client: openai.AsyncOpenAI, row: dict[str, Any]) -> dict[str, Any]:
    """Answers ``row["messages"]`` with the calculator tool; reward 1 if ``row["answer"]``."""
    messages: list[dict[str, Any]] = list(row["messages"])
    calls = 0
    while True:
        response = await client.chat.completions.create(
            model=MODEL, messages=messages, tools=[CALCULATOR_TOOL]
        )
        message = response.choices[0].message
        messages.append(message.model_dump(exclude_none=True))
        if not message.tool_calls or calls >= MAX_CALCULATOR_CALLS:
            solved = final_answer(message.content) == row["answer"]
            return {"reward": float(solved), "calculator_calls": calls, "solved": solved}
        for call in message.tool_calls:
            calls += 1
            try:
                result = evaluate(json.loads(call.function.arguments)["expression"])
            except (ValueError, KeyError, TypeError) as exc:
                result = f"error: {exc}"
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})


GUESS_MAX = 16
GUESS_TURNS = 16
GUESS_TURN_COST = 0.05


async def guess(client: openai.AsyncOpenAI, row: dict[str, Any]) -> dict[str, Any]:
    """Plays one game: the row's ``secret`` (the held-out rows give one) or ``row["game"]``'s;
    every guess is one call."""
    secret = row.get("secret") or random.Random(row["game"]).randint(1, GUESS_MAX)
    messages: list[dict[str, Any]] = list(row["messages"])
    for turn in range(1, GUESS_TURNS + 1):
        response = await client.chat.completions.create(model=MODEL, messages=messages)
        text = response.choices[0].message.content or ""
        messages.append({"role": "assistant", "content": text})
        guessed = final_answer(text)
        if guessed == secret:
            return {"reward": 1.0 - GUESS_TURN_COST * (turn - 1), "turns": turn, "solved": True}
        if guessed is None:
            hint = "Guess a number."
        else:
            hint = "higher" if guessed < secret else "lower"
        messages.append({"role": "user", "content": hint})
    return {"reward": 0.0, "turns": GUESS_TURNS, "solved": False}
