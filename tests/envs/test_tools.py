"""A tool class as an environment: schemas from signatures and docstrings, calls run, every
mistake an error observation that is counted."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any, Literal

import pytest

from rlfleet.envs.parsers import ParsedCalls, ToolCall
from rlfleet.envs.protocol import Step
from rlfleet.envs.tools import (
    ToolDefinitionError,
    ToolEnvironment,
    split_docstring,
    tool_result_text,
    tool_schemas,
)


class Calculator:
    """Tools for sums, with state (the last result) and lifecycle hooks."""

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset
        self.events: list[Any] = []

    def reset(self, row: dict[str, Any], seed: int) -> None:
        self.events.append(("reset", row, seed))

    def close(self) -> None:
        self.events.append("close")

    def add(self, a: int, b: int = 1) -> int:
        """Add two integers.

        Shown to the model as one line.

        Args:
            a: The first number.
            b (int): The second number,
                one by default.

        Returns:
            The sum.
        """
        return a + b + self.offset

    def divide(self, a: float, b: float) -> float:
        """Divide a by b."""
        return a / b

    async def lookup(self, key: Literal["pi", "e"], digits: int | None = None) -> str:
        """Look up a constant.

        Args:
            key: Which constant.
            digits: How many digits (all when omitted).
        """
        await asyncio.sleep(0)
        value = {"pi": "3.14159", "e": "2.71828"}[key]
        return value if digits is None else value[: digits + 2]

    def tag(self, items: list[str], meta: dict[str, Any], loud: bool = False) -> dict:
        """Tag items."""
        return {"items": [item.upper() if loud else item for item in items], "meta": meta}

    @staticmethod
    def version() -> str:
        """The version of these tools."""
        return "1"

    def _helper(self) -> None:
        """Private: not a tool."""

    @property
    def last(self) -> int:
        """A property: not a tool."""
        return 0


def call(name: str, **arguments: Any) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def run_step(env: ToolEnvironment, text: str) -> Step:
    return asyncio.run(env.step(text))


def test_schemas_from_signatures_and_docstrings() -> None:
    schemas = {s["function"]["name"]: s for s in tool_schemas(Calculator)}
    assert list(schemas) == ["add", "divide", "lookup", "tag", "version"]
    assert schemas["add"] == {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers.",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "description": "The first number."},
                    "b": {
                        "type": "integer",
                        "default": 1,
                        "description": "The second number, one by default.",
                    },
                },
                "required": ["a"],
            },
        },
    }
    add = schemas["add"]["function"]["parameters"]
    assert list(add) == ["type", "properties", "required"]  # as transformers lays it out
    assert list(add["properties"]["b"]) == ["type", "default", "description"]
    lookup = schemas["lookup"]["function"]["parameters"]
    assert lookup["properties"]["key"] == {
        "type": "string",
        "enum": ["pi", "e"],
        "description": "Which constant.",
    }
    assert lookup["properties"]["digits"]["anyOf"] == [{"type": "integer"}, {"type": "null"}]
    assert lookup["required"] == ["key"]
    tag = schemas["tag"]["function"]["parameters"]["properties"]
    assert tag["items"] == {"type": "array", "items": {"type": "string"}}
    assert tag["meta"]["type"] == "object" and tag["loud"]["type"] == "boolean"
    assert schemas["version"]["function"]["parameters"] == {"type": "object", "properties": {}}
    assert tool_schemas(Calculator()) == list(schemas.values())
    json.dumps(list(schemas.values()))


def test_docstring_args_section() -> None:
    doc = (
        "Search.\n\nArgs:\n    query (str): What to find.\n    *rest: More\n        words.\n"
        "Note:\n    x: no"
    )
    assert split_docstring(doc) == ("Search.", {"query": "What to find.", "rest": "More words."})
    assert split_docstring("One\nline.\n\nMore.") == ("One line.", {})


class NoHints:
    def run(self, code) -> str:  # noqa: ANN001
        """Run code."""
        return code


class NoDocstring:
    def run(self, code: str) -> str:
        return code


class Variadic:
    def run(self, *codes: str) -> str:
        """Run codes."""
        return ""


class Opaque:
    def run(self, lock: threading.Lock) -> str:
        """Take a lock."""
        return ""


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (NoHints, "NoHints.run has no type hint for 'code'; the hints are the tool's schema"),
        (
            NoDocstring,
            "NoDocstring.run has no docstring; a tool's docstring is its description for the model",
        ),
        (Variadic, "Variadic.run takes *codes; a tool's parameters must each be named"),
        (Opaque, "Opaque.run: its parameters cannot be described as JSON (PydanticSchema"),
    ],
)
def test_undescribable_tools_are_one_line_errors(cls: type, message: str) -> None:
    with pytest.raises(ToolDefinitionError) as raised:
        tool_schemas(cls)
    assert str(raised.value).startswith(message)
    assert "\n" not in str(raised.value)


def test_calls_run_and_results_are_tool_messages() -> None:
    env = ToolEnvironment(Calculator(offset=10))
    text = "Sure. " + call("add", a=1, b=2) + call("lookup", key="pi", digits=2) + call("version")
    step = run_step(env, text)
    assert step == Step(
        observation=[
            {"role": "tool", "name": "add", "content": "13"},
            {"role": "tool", "name": "lookup", "content": "3.14"},
            {"role": "tool", "name": "version", "content": "1"},
        ],
        info={
            "tool_calls": {"add": 1, "lookup": 1, "version": 1},
            "tool_errors": {},
            "malformed_tool_calls": 0,
        },
    )


def test_containers_come_back_as_json() -> None:
    step = run_step(ToolEnvironment(Calculator()), call("tag", items=["a"], meta={"k": 1}))
    assert step.observation == [
        {"role": "tool", "name": "tag", "content": '{"items": ["a"], "meta": {"k": 1}}'}
    ]
    assert tool_result_text(None) == "" and tool_result_text(2.5) == "2.5"


def test_a_turn_without_calls_ends_the_trajectory() -> None:
    step = run_step(ToolEnvironment(Calculator()), "The answer is 3.")
    assert step == Step(
        done=True, info={"tool_calls": {}, "tool_errors": {}, "malformed_tool_calls": 0}
    )


def test_every_mistake_is_an_error_observation_and_counted() -> None:
    env = ToolEnvironment(Calculator())
    text = (
        call("divide", a=1, b=0)  # the tool raises
        + call("add", a="1", c=2)  # wrong type, unknown argument
        + call("add")  # missing argument
        + call("lookup", key="tau")  # not one of the Literal's values
        + call("rm", path="/")  # no such tool
        + "<tool_call>{oops</tool_call>"  # malformed
        + call("add", a=2)  # still runs
    )
    step = run_step(env, text)
    assert step.done is False
    assert step.observation == [
        {
            "role": "tool",
            "name": "divide",
            "content": "error: ZeroDivisionError: float division by zero",
        },
        {
            "role": "tool",
            "name": "add",
            "content": "error: bad arguments for add: a: Input should be a valid integer; "
            "c: unexpected argument",
        },
        {"role": "tool", "name": "add", "content": "error: bad arguments for add: a: missing"},
        {
            "role": "tool",
            "name": "lookup",
            "content": "error: bad arguments for lookup: key: Input should be 'pi' or 'e'",
        },
        {
            "role": "tool",
            "name": "rm",
            "content": "error: unknown tool 'rm'; tools: add, divide, lookup, tag, version",
        },
        {
            "role": "tool",
            "content": "error: malformed tool call: bad JSON (Expecting property name enclosed "
            "in double quotes at char 1)",
        },
        {"role": "tool", "name": "add", "content": "3"},
    ]
    assert step.info == {
        "tool_calls": {"divide": 1, "add": 3, "lookup": 1},
        "tool_errors": {"divide": 1, "add": 2, "lookup": 1},
        "malformed_tool_calls": 2,
    }


def test_a_multi_line_error_is_one_line() -> None:
    class Failing:
        def fail(self) -> str:
            """Fail loudly."""
            raise RuntimeError("first line\nsecond line")

    step = run_step(ToolEnvironment(Failing()), call("fail"))
    assert step.observation == [
        {"role": "tool", "name": "fail", "content": "error: RuntimeError: first line"}
    ]


def test_reset_and_close_hooks_are_called_and_not_tools() -> None:
    tools = Calculator()
    env = ToolEnvironment(tools)
    assert asyncio.run(env.reset({"prompt": "p"}, 7)) is None
    assert env.close() is None
    assert tools.events == [("reset", {"prompt": "p"}, 7), "close"]
    assert "reset" not in {s["function"]["name"] for s in env.schemas}


def test_hooks_are_optional() -> None:
    class Bare:
        def ping(self) -> str:
            """Answer pong."""
            return "pong"

    env = ToolEnvironment(Bare())
    assert asyncio.run(env.reset({}, 0)) is None
    assert env.close() is None


def test_async_tools_and_hooks_and_plain_tools_off_the_loop() -> None:
    """A plain tool runs in a worker thread: another trajectory's step proceeds meanwhile."""
    started, release = threading.Event(), threading.Event()

    class Mixed:
        async def reset(self, row: dict[str, Any], seed: int) -> list[dict[str, str]]:
            return [{"role": "user", "content": f"seed {seed}"}]

        def block(self) -> str:
            """Wait until released."""
            started.set()
            release.wait(5)
            return "released"

        async def ping(self) -> str:
            """Answer pong."""
            return "pong"

        async def close(self) -> None:
            closed.append(True)

    closed: list[bool] = []

    async def both() -> tuple[Step, Step]:
        slow = asyncio.create_task(ToolEnvironment(Mixed()).step(call("block")))
        await asyncio.to_thread(started.wait, 5)
        fast = await ToolEnvironment(Mixed()).step(call("ping"))
        release.set()
        return await slow, fast

    slow, fast = asyncio.run(both())
    assert fast.observation == [{"role": "tool", "name": "ping", "content": "pong"}]
    assert slow.observation == [{"role": "tool", "name": "block", "content": "released"}]
    env = ToolEnvironment(Mixed())
    assert asyncio.run(env.reset({}, 3)) == [{"role": "user", "content": "seed 3"}]
    asyncio.run(env.close())  # an async close hook: its coroutine is the caller's to await
    assert closed == [True]


def test_a_custom_parser_is_used() -> None:
    def every_word_adds(text: str) -> ParsedCalls:
        return ParsedCalls(tuple(ToolCall("add", {"a": len(w)}, w) for w in text.split()))

    step = run_step(ToolEnvironment(Calculator(), every_word_adds), "ab c")
    assert [m["content"] for m in step.observation] == ["3", "2"]


def test_an_unknown_parser_name_is_refused() -> None:
    with pytest.raises(KeyError, match="unknown tool parser 'xml'"):
        ToolEnvironment(Calculator(), "xml")


def test_a_tool_result_that_reports_an_error_counts_as_a_tool_error() -> None:
    """The sandboxed python tool returns ``error: ...`` texts rather than raising."""
    import asyncio

    from rlfleet.envs.tools import ToolEnvironment

    class Runner:
        def run(self, code: str) -> str:
            """Run code.

            Args:
                code: The code.
            """
            return "error: the code ran past its 1 s time limit" if "loop" in code else "ok"

    env = ToolEnvironment(Runner())
    calls = (
        '<tool_call>\n{"name": "run", "arguments": {"code": "loop"}}\n</tool_call>'
        '<tool_call>\n{"name": "run", "arguments": {"code": "x"}}\n</tool_call>'
    )
    step = asyncio.run(env.step(calls))
    assert [m["content"] for m in step.observation] == [
        "error: the code ran past its 1 s time limit",
        "ok",
    ]
    assert step.info["tool_calls"] == {"run": 2} and step.info["tool_errors"] == {"run": 1}
