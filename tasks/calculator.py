"""The calculator task of the agent demo: arithmetic a tiny model cannot do alone, and a tool.

A problem is a product of two 2-digit numbers or a sum of two 4-digit numbers
(``"What is 37*48?"``, answer ``1776``). The tiny model cannot compute these, but it can call
the ``calculator`` tool (``Calculator``, the job's ``env.tools`` class) in the Hermes/Qwen
format and copy the result::

    assistant: <tool_call>
               {"name": "calculator", "arguments": {"expression": "37*48"}}
               </tool_call>
    tool:      1776
    assistant: 1776

Its pretraining corpus (``conversations``) mixes such tool dialogues (a fraction ``p_tool``)
with direct answers that are near misses, so the pretrained model calls the tool about
``p_tool`` of the time and is otherwise wrong: RL (``calculator_reward``) has one decision to
sharpen, the first token of the turn, and the copying it needs is already learned.

``examples/agent_calculator_prompts.jsonl`` and ``..._eval.jsonl`` are ``write_prompts``'s
output (``python -m rlfleet.tasks.calculator examples/agent_calculator_prompts.jsonl``).
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Message = dict[str, Any]

TOOL_NAME = "calculator"
MAX_EXPRESSION_CHARS = 64
"""Longer expressions are refused: with + - * only, this bounds the result's size (no
``9**9**9``-style blow-up is possible, and a product of 64 characters of digits stays small)."""
QUESTIONS = ("What is {}?",)
HELD_OUT_FRACTION = 0.1
SPLIT_SEED = 0
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_RESPONSE_CLOSE = "</tool_response>"


@dataclass(frozen=True)
class Problem:
    """``a op b`` with ``op`` one of ``*`` (2-digit operands) or ``+`` (4-digit operands)."""

    a: int
    op: str
    b: int

    @property
    def expression(self) -> str:
        return f"{self.a}{self.op}{self.b}"

    @property
    def answer(self) -> int:
        return self.a * self.b if self.op == "*" else self.a + self.b


def random_problem(rng: random.Random) -> Problem:
    """Half products of 2-digit numbers, half sums of 4-digit numbers: both beyond a tiny
    model's arithmetic, both a single calculator call."""
    if rng.random() < 0.5:
        return Problem(rng.randint(10, 99), "*", rng.randint(10, 99))
    return Problem(rng.randint(1000, 9999), "+", rng.randint(1000, 9999))


class Calculator:
    """The tool class of the agent demo (``env.tools: rlfleet.tasks.calculator:Calculator``)."""

    def calculator(self, expression: str) -> str:
        """Exact integer arithmetic.

        Args:
            expression: Integers with + - *, e.g. 37*48
        """
        try:
            return str(evaluate(expression))
        except ValueError as exc:
            return f"error: {exc}"


_OPERATORS = {ast.Add: int.__add__, ast.Sub: int.__sub__, ast.Mult: int.__mul__}


def evaluate(expression: str) -> int:
    """The value of an expression of integers, ``+``, ``-``, ``*`` and parentheses.

    Parsed with ``ast`` and walked node by node: nothing is ever ``eval``-ed, and any other
    node (names, calls, division, powers, floats) is a ``ValueError``, as is an expression
    longer than ``MAX_EXPRESSION_CHARS``.
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    return _value(tree.body)


def _value(node: ast.AST) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _value(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_value(node.left), _value(node.right))
    raise ValueError("only integers, +, - and * are allowed")


def tool_schemas() -> list[dict[str, Any]]:
    """The JSON schemas the chat template lists, as the job's tool environment makes them
    (envs/tools.py): transformers' ``get_json_schema`` less its ``return`` entry. The model
    pretrains on exactly the system turn it is shown in training (a test keeps the two equal)."""
    from transformers.utils import get_json_schema

    schema = get_json_schema(Calculator().calculator)
    schema["function"].pop("return", None)
    return [schema]


def tool_call_text(expression: str) -> str:
    """The assistant turn that calls the calculator, in the Hermes/Qwen format."""
    call = {"name": TOOL_NAME, "arguments": {"expression": expression}}
    return f"{TOOL_CALL_OPEN}\n{json.dumps(call)}\n{TOOL_CALL_CLOSE}"


def question(problem: Problem, rng: random.Random) -> Message:
    return {"role": "user", "content": rng.choice(QUESTIONS).format(problem.expression)}


def near_miss(answer: int, rng: random.Random) -> int:
    """A wrong answer of about the right size (off by 1% to 20%), as a guessing model writes."""
    offset = max(1, round(answer * rng.uniform(0.01, 0.2)))
    return answer + rng.choice((-offset, offset))


def conversation(problem: Problem, rng: random.Random, p_tool: float) -> list[Message]:
    """One pretraining dialogue: with probability ``p_tool`` the assistant calls the
    calculator and copies its result, otherwise it answers directly with a near miss."""
    if rng.random() >= p_tool:
        answer = {"role": "assistant", "content": str(near_miss(problem.answer, rng))}
        return [question(problem, rng), answer]
    return [
        question(problem, rng),
        {"role": "assistant", "content": tool_call_text(problem.expression)},
        {"role": "tool", "content": str(problem.answer)},
        {"role": "assistant", "content": str(problem.answer)},
    ]


def conversations(n: int, *, p_tool: float = 0.25, seed: int = 0) -> list[list[Message]]:
    """``n`` pretraining dialogues, the same for the same seed."""
    if not 0 <= p_tool <= 1:
        raise ValueError(f"p_tool must be in [0, 1], got {p_tool}")
    rng = random.Random(seed)
    return [conversation(random_problem(rng), rng, p_tool) for _ in range(n)]


def prompt_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Dataset rows: the user's question as ``messages`` and the exact ``answer``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        problem = random_problem(rng)
        rows.append({"messages": [question(problem, rng)], "answer": problem.answer})
    return rows


def write_prompts(path: str | Path, n: int = 2000, seed: int = SPLIT_SEED) -> tuple[Path, Path]:
    """The training prompts at ``path`` and held-out ones beside it (``<stem>_eval.jsonl``),
    JSONL rows ``{"messages", "answer"}``; the eval rows' problems never appear in training."""
    rows = prompt_rows(n, seed)
    n_eval = round(n * HELD_OUT_FRACTION)
    eval_rows = rows[:n_eval]
    held_out = {json.dumps(row["messages"]) for row in eval_rows}
    train_rows = [row for row in rows[n_eval:] if json.dumps(row["messages"]) not in held_out]
    return _write_jsonl(path, train_rows), _write_jsonl(eval_path(path), eval_rows)


def eval_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f"{path.stem}_eval{path.suffix}")


def _write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


_INTEGER = re.compile(r"[-+]?\d+")
_TURN_HEADER = re.compile(r"^\s*(?:<\|im_end\|>)?\s*(?:<\|im_start\|>)?\s*assistant\s*\n")


def final_answer(response: str) -> int | None:
    """The first integer of the last assistant turn: the text after the last tool response
    (the whole response when there is none), less the assistant turn's header; None when that
    turn is another tool call or has no integer.

    The header is ``assistant\\n`` with or without ChatML's turn tokens around it, so the
    response may be decoded with or without special tokens."""
    last_turn = response.rpartition(TOOL_RESPONSE_CLOSE)[2]
    last_turn = _TURN_HEADER.sub("", last_turn, count=1)
    if TOOL_CALL_OPEN in last_turn:
        return None
    match = _INTEGER.search(last_turn)
    return None if match is None else int(match.group(0))


def calculator_reward(
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    answer_field: str = "answer",
    **fields: Sequence[Any],
) -> list[float]:
    """1.0 where the final answer (``final_answer``) equals the sample's answer, else 0.0.

    A reward function as ``rlfleet.reward.functions`` defines them: ``responses`` are the
    whole trajectories after the prompt (the model's turns and the tool responses between
    them), so only what the model writes after the last tool response is scored, and copying
    the calculator's result is what earns the reward. The reference answers are the
    per-sample list ``fields[answer_field]``; a missing one is an error naming the sample."""
    if answer_field not in fields or len(fields[answer_field]) != len(responses):
        raise ValueError(f"calculator_reward needs one {answer_field!r} value per response")
    scores = []
    for index, (response, reference) in enumerate(
        zip(responses, fields[answer_field], strict=True)
    ):
        if reference is None:
            raise ValueError(f"calculator_reward: sample {index} has no {answer_field!r}")
        scores.append(1.0 if final_answer(response) == int(reference) else 0.0)
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="write the calculator task's prompt files")
    parser.add_argument("path", type=Path, help="the training prompts (JSONL); eval beside it")
    parser.add_argument("--n", type=int, default=2000, help="rows before the held-out split")
    parser.add_argument("--seed", type=int, default=SPLIT_SEED)
    args = parser.parse_args(argv)
    for path in write_prompts(args.path, args.n, args.seed):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
