"""Small environments written with ``verifiers`` 0.4.0's own classes (``verifiers.v1``), for the
tests of envs/verifiers_agent.py. Each is exposed as ``load_*(**kwargs)`` returning a ``vf.Env``:

- ``load_arithmetic``: single turn. A taskset of sums whose task's rubric is an exact match of
  the reply with the row's ``answer`` (``@vf.reward``) plus the reply's length (``@vf.metric``),
  played by one ``null``-harness seat with ``max_turns=1``.
- ``load_guess``: multi-turn. Guess-the-number: the env's own ``run`` drives the seat's
  interaction, answering each wrong guess with a hint (``"higher"``/``"lower"``) as the next
  user turn and ending the game when the number is found (verifiers' ``interaction.turn``;
  ``max_turns`` caps it). The task's rubric: found or not, and how many guesses.
- ``load_calculator``: tools. The task serves a ``vf.Toolset`` MCP server with one python
  function tool, ``calculator_evaluate(expression)``; its rubric is the exact match plus the
  number of tool results.

verifiers resolves a taskset (and the env a taskset ships) by importing its id as a top-level
module exporting one ``Taskset`` subclass; each taskset here is registered in ``sys.modules``
under its id. Tool servers run as ``python -m rlfleet.tests.support.vf_envs`` (the
``__main__`` block), so this module is imported by that name.
"""

from __future__ import annotations

import ast
import operator
import re
import sys
import types
from collections.abc import Iterator
from typing import Any

import verifiers.v1 as vf

ARITHMETIC_ID = "rlfleet_vf_test_arithmetic"
GUESS_ID = "rlfleet_vf_test_guess"
CALCULATOR_ID = "rlfleet_vf_test_calculator"


# --- single turn: exact match on a sum ---------------------------------------------------------


class ArithmeticData(vf.TaskData):
    answer: str


class ArithmeticTask(vf.Task[ArithmeticData, vf.State, vf.TaskConfig]):
    @vf.reward
    async def exact_match(self, task: ArithmeticData, trace: vf.Trace) -> float:
        return float(trace.last_reply.strip() == task.answer)

    @vf.metric
    async def reply_chars(self, trace: vf.Trace) -> float:
        return float(len(trace.last_reply))


class ArithmeticTaskset(vf.Taskset[ArithmeticTask, vf.TasksetConfig]):
    def load(self) -> Iterator[ArithmeticTask]:
        for a, b in [(2, 3), (7, 5), (12, 30)]:
            data = ArithmeticData(prompt=f"What is {a} + {b}?", answer=str(a + b))
            yield ArithmeticTask(data, self.config.task)


def load_arithmetic(**kwargs: Any) -> vf.Env:
    agent = {"harness": {"id": "null"}, "max_turns": 1, **kwargs}
    return _load({"taskset": {"id": ARITHMETIC_ID}, "agent": agent})


# --- multi-turn: guess the number, with hints ---------------------------------------------------

SECRET_INSTRUCTIONS = "I picked a whole number from 1 to 100. Guess it: reply with one number."


class GuessData(vf.TaskData):
    secret: int


def first_number(text: str) -> int | None:
    match = re.search(r"-?\d+", text or "")
    return int(match.group()) if match else None


def hint(guess: int | None, secret: int) -> str:
    if guess is None:
        return "That is not a number. Reply with one number."
    return "Higher." if guess < secret else "Lower."


class GuessTask(vf.Task[GuessData, vf.State, vf.TaskConfig]):
    @vf.reward
    async def found(self, task: GuessData, trace: vf.Trace) -> float:
        guesses = [first_number(m.content or "") for m in trace.assistant_messages]
        return float(task.secret in guesses)

    @vf.metric
    async def guesses(self, trace: vf.Trace) -> float:
        return float(len(trace.assistant_messages))


class GuessTaskset(vf.Taskset[GuessTask, vf.TasksetConfig]):
    def load(self) -> Iterator[GuessTask]:
        for secret in (17, 50, 83):
            yield GuessTask(GuessData(prompt=SECRET_INSTRUCTIONS, secret=secret), self.config.task)


class GuessEnvConfig(vf.EnvConfig):
    player: vf.AgentConfig = vf.AgentConfig(harness={"id": "null"}, max_turns=6)


class GuessEnv(vf.Env[GuessEnvConfig]):
    """The game is the user: each wrong guess gets a hint as the next turn (verifiers' old
    ``env_response``); a right guess ends the exchange (``is_completed``)."""

    async def run(self, task: GuessTask, agents: vf.Agents) -> None:
        async with agents.player.interaction(task) as game:
            segment = await game.turn()
            while not segment.terminated:
                guess = first_number(segment.last_reply)
                if guess == task.data.secret:
                    return
                segment = await game.turn(hint(guess, task.data.secret))


def load_guess(**kwargs: Any) -> vf.Env:
    return _load({"taskset": {"id": GUESS_ID}, "player": kwargs})


# --- tools: a python calculator function served as an MCP tool ----------------------------------

_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.USub: operator.neg,
}


def evaluate(expression: str) -> float:
    """``expression``'s value: numbers, ``+ - * /``, unary minus and parentheses only."""

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        raise ValueError(f"unsupported expression: {ast.dump(node)}")

    return value(ast.parse(expression, mode="eval").body)


class Calculator(vf.Toolset[vf.ToolsetConfig, vf.State]):
    @vf.tool
    async def evaluate(self, expression: str) -> str:
        """Evaluate an arithmetic expression (numbers, + - * / and parentheses)."""
        try:
            result = evaluate(expression)
        except (ValueError, SyntaxError, ZeroDivisionError) as exc:
            return f"error: {exc}"
        return str(int(result)) if float(result).is_integer() else str(result)


TOOL_NAME = "calculator_evaluate"
"""How the model sees the tool: the server's name (``calculator``), then the function's."""


class CalculatorTaskConfig(vf.TaskConfig):
    calculator: vf.ToolsetConfig = vf.ToolsetConfig()


class CalculatorTask(vf.Task[ArithmeticData, vf.State, CalculatorTaskConfig]):
    @classmethod
    def toolsets(cls, config: CalculatorTaskConfig) -> list[vf.Toolset]:
        return [Calculator(config.calculator)]

    @vf.reward
    async def exact_match(self, task: ArithmeticData, trace: vf.Trace) -> float:
        return float(trace.last_reply.strip() == task.answer)

    @vf.metric
    async def tool_results(self, trace: vf.Trace) -> float:
        return float(len(trace.tool_messages))


class CalculatorTasksetConfig(vf.TasksetConfig):
    task: CalculatorTaskConfig = CalculatorTaskConfig()


class CalculatorTaskset(vf.Taskset[CalculatorTask, CalculatorTasksetConfig]):
    def load(self) -> Iterator[CalculatorTask]:
        for a, b in [(12, 34), (56, 78)]:
            data = ArithmeticData(
                prompt=f"Use the calculator: what is {a} * {b}?", answer=str(a * b)
            )
            yield CalculatorTask(data, self.config.task)


def load_calculator(**kwargs: Any) -> vf.Env:
    agent = {"harness": {"id": "null"}, "max_turns": 4, **kwargs}
    return _load({"taskset": {"id": CALCULATOR_ID}, "agent": agent})


# --- packaging -----------------------------------------------------------------------------------


def _register(taskset_id: str, *exports: type) -> None:
    """Make ``taskset_id`` importable as verifiers imports a taskset: a module exporting the
    taskset (and the env it ships) through ``__all__``."""
    if taskset_id in sys.modules:
        return
    module = types.ModuleType(taskset_id, f"verifiers test taskset {taskset_id}")
    for cls in exports:
        setattr(module, cls.__name__, cls)
    module.__all__ = [cls.__name__ for cls in exports]
    sys.modules[taskset_id] = module


_register(ARITHMETIC_ID, ArithmeticTaskset)
_register(GUESS_ID, GuessTaskset, GuessEnv)
_register(CALCULATOR_ID, CalculatorTaskset)


def _load(config: dict[str, Any]) -> vf.Env:
    return vf.load_environment(vf.resolve_env_config(config))


def __getattr__(name: str) -> Any:
    """``ENV``: an ``Env`` instance (the arithmetic one), for the ``"module:attr"`` form; built on
    access, so a tool server's process does not build it."""
    if name == "ENV":
        return load_arithmetic()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":  # a task's tool server (verifiers runs ``python -m <module>``)
    Calculator.run()
