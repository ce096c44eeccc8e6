"""Tool calls read from the model's text, one parser per format, chosen by name
(``env.tool_parser``).

A parser turns one assistant turn into its calls, in the order they appear: each either a
``ToolCall`` (a name and an arguments object) or a ``MalformedCall`` (why it could not be read).
A malformed call is never an exception: the model wrote it, so the model is told what was wrong
(a ``tool`` message) and the call is counted (envs/tools.py).

``hermes`` reads the format of Hermes 2 Pro, Qwen2.5 and Qwen3 (their chat templates ask for
it)::

    <tool_call>
    {"name": "add", "arguments": {"a": 1, "b": 2}}
    </tool_call>

Edge cases, as vLLM's hermes parser and the RL frameworks built on it meet them:

- several blocks in one turn, text before, between and after them (ignored);
- ``arguments`` as an object or as a JSON string of one (some models write the latter), or
  absent (a tool without parameters);
- an unclosed ``<tool_call>`` at the end of the turn (generation stopped at ``</tool_call>``
  as a stop string, or the turn was cut by its token budget): a call when its JSON is complete,
  else malformed; a partial ``</tool_`` at the very end is dropped first;
- a ``<tool_call>`` opened before the previous one closed: the previous one ends there;
- a reasoning block: with a ``</think>``, only the text after the last one is read (calls a
  model drafts while thinking are not calls).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ToolCall:
    """A call that was read: the tool's name, its arguments and the text it came from."""

    name: str
    arguments: dict[str, Any]
    text: str


@dataclass(frozen=True)
class MalformedCall:
    """A call that could not be read: its text, a short reason for the model, and its name when
    that much could be read (None otherwise)."""

    text: str
    reason: str
    name: str | None = None


@dataclass(frozen=True)
class ParsedCalls:
    """Every call of one turn, well-formed or not, in the order the model wrote them."""

    items: tuple[ToolCall | MalformedCall, ...] = ()

    @property
    def calls(self) -> list[ToolCall]:
        return [item for item in self.items if isinstance(item, ToolCall)]

    @property
    def malformed(self) -> list[MalformedCall]:
        return [item for item in self.items if isinstance(item, MalformedCall)]


ToolParser = Callable[[str], ParsedCalls]
"""A parser: the text of one assistant turn in, its calls out; it never raises."""

TOOL_PARSERS: dict[str, ToolParser] = {}
"""The parsers by the name ``env.tool_parser`` gives."""


def register_tool_parser(name: str) -> Callable[[ToolParser], ToolParser]:
    """A decorator adding a parser to ``TOOL_PARSERS`` under ``name`` (each name once)."""

    def add(parser: ToolParser) -> ToolParser:
        if name in TOOL_PARSERS:
            raise ValueError(f"tool parser {name!r} is already registered")
        TOOL_PARSERS[name] = parser
        return parser

    return add


def get_tool_parser(name: str) -> ToolParser:
    """The parser registered as ``name``; a KeyError listing the known names otherwise (the
    message is the one line a config check shows)."""
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        known = ", ".join(sorted(TOOL_PARSERS))
        raise KeyError(f"unknown tool parser {name!r}; known: {known}") from None


HERMES_OPEN = "<tool_call>"
HERMES_CLOSE = "</tool_call>"
THINK_CLOSE = "</think>"


@register_tool_parser("hermes")
def parse_hermes(text: str) -> ParsedCalls:
    """Every ``<tool_call>`` block of ``text`` (after its last ``</think>``, if any)."""
    think_end = text.rfind(THINK_CLOSE)
    if think_end != -1:
        text = text[think_end + len(THINK_CLOSE) :]
    items: list[ToolCall | MalformedCall] = []
    position = 0
    while (start := text.find(HERMES_OPEN, position)) != -1:
        body_start = start + len(HERMES_OPEN)
        body, end, closed = _hermes_block(text, body_start)
        items.append(read_json_call(body, text[start:end], closed))
        position = end
    return ParsedCalls(tuple(items))


def _hermes_block(text: str, body_start: int) -> tuple[str, int, bool]:
    """The body of the block whose JSON starts at ``body_start``, where the block ends, and
    whether it was closed (rather than cut by the next opening tag or the end of the text)."""
    close = text.find(HERMES_CLOSE, body_start)
    next_open = text.find(HERMES_OPEN, body_start)
    if close != -1 and (next_open == -1 or close < next_open):
        return text[body_start:close], close + len(HERMES_CLOSE), True
    end = len(text) if next_open == -1 else next_open
    return _without_partial_tag(text[body_start:end], HERMES_CLOSE), end, False


def _without_partial_tag(body: str, tag: str) -> str:
    """``body`` less a beginning of ``tag`` at its very end (``</tool_`` of a cut turn)."""
    stripped = body.rstrip()
    for length in range(len(tag) - 1, 0, -1):
        if stripped.endswith(tag[:length]):
            return stripped[:-length]
    return body


def read_json_call(body: str, text: str, closed: bool = True) -> ToolCall | MalformedCall:
    """A call from a JSON object with ``name`` and ``arguments`` (an object, a JSON string of
    one, or absent); a ``MalformedCall`` saying what is wrong otherwise. Shared by the parsers
    of formats that wrap such an object in their own markers."""
    body = body.strip()
    if not body:
        return MalformedCall(text, "empty tool call (no JSON object)")
    try:
        value = json.loads(body)
    except json.JSONDecodeError as error:
        detail = f"{error.msg} at char {error.pos}"
        if not closed:
            return MalformedCall(text, f"unclosed tool call with incomplete JSON ({detail})")
        return MalformedCall(text, f"bad JSON ({detail})")
    if not isinstance(value, dict):
        return MalformedCall(text, f"expected a JSON object, got {_json_type(value)}")
    name = value.get("name")
    if not isinstance(name, str) or not name:
        return MalformedCall(text, "missing name (a non-empty string)")
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            return MalformedCall(text, f"arguments are a string but not JSON ({error.msg})", name)
    if not isinstance(arguments, dict):
        return MalformedCall(text, f"arguments not an object (got {_json_type(arguments)})", name)
    return ToolCall(name, arguments, text)


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for a reason the model reads."""
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")
