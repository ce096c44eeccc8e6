"""Tool calls read from the model's text: the hermes format and its edge cases, the registry."""

from __future__ import annotations

import pytest

from rlfleet.envs.parsers import (
    TOOL_PARSERS,
    MalformedCall,
    ToolCall,
    get_tool_parser,
    parse_hermes,
    register_tool_parser,
)


def block(body: str) -> str:
    return f"<tool_call>\n{body}\n</tool_call>"


def test_one_call_with_text_around_it() -> None:
    call = block('{"name": "add", "arguments": {"a": 1, "b": 2}}')
    parsed = parse_hermes(f"Let me add.\n{call}\nDone?")
    assert parsed.items == (ToolCall("add", {"a": 1, "b": 2}, call),)
    assert parsed.malformed == []


def test_several_calls_keep_their_order() -> None:
    text = (
        block('{"name": "b", "arguments": {}}')
        + " then "
        + block('{"name": "a", "arguments": {"x": [1]}}')
    )
    assert [(c.name, c.arguments) for c in parse_hermes(text).calls] == [
        ("b", {}),
        ("a", {"x": [1]}),
    ]


def test_arguments_as_a_json_string_or_absent() -> None:
    text = block('{"name": "f", "arguments": "{\\"q\\": \\"x\\"}"}') + block('{"name": "g"}')
    assert [(c.name, c.arguments) for c in parse_hermes(text).calls] == [
        ("f", {"q": "x"}),
        ("g", {}),
    ]


def test_no_call_is_an_empty_result() -> None:
    parsed = parse_hermes("The answer is 4.")
    assert parsed.items == ()
    assert parsed.calls == [] and parsed.malformed == []


@pytest.mark.parametrize(
    ("body", "reason", "name"),
    [
        ('{"name": "f", "arguments": {"a": 1}', "bad JSON (Expecting ',' delimiter at char", None),
        ('["f"]', "expected a JSON object, got an array", None),
        ('{"arguments": {}}', "missing name (a non-empty string)", None),
        ('{"name": 3}', "missing name (a non-empty string)", None),
        ('{"name": "f", "arguments": [1]}', "arguments not an object (got an array)", "f"),
        ('{"name": "f", "arguments": "{oops"}', "arguments are a string but not JSON", "f"),
        ('{"name": "f", "arguments": "3"}', "arguments not an object (got a number)", "f"),
        ("", "empty tool call (no JSON object)", None),
        (
            "{'name': 'f'}",
            "bad JSON (Expecting property name enclosed in double quotes at char 1)",
            None,
        ),
    ],
)
def test_malformed_calls_say_why(body: str, reason: str, name: str | None) -> None:
    text = block(body)
    [item] = parse_hermes(f"x {text} y").items
    assert isinstance(item, MalformedCall)
    assert item.reason.startswith(reason)
    assert (item.text, item.name) == (text, name)


def test_a_malformed_call_does_not_hide_the_good_ones() -> None:
    text = block("{bad") + block('{"name": "ok", "arguments": {}}')
    parsed = parse_hermes(text)
    assert [type(item) for item in parsed.items] == [MalformedCall, ToolCall]
    assert parsed.calls[0].name == "ok"


def test_unclosed_call_with_complete_json_is_a_call() -> None:
    """Generation stopped at ``</tool_call>`` as a stop string (or just before it)."""
    for ending in ("", "\n", "\n</tool", "\n</tool_call"):
        text = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}' + ending
        assert parse_hermes(text).items == (ToolCall("f", {"a": 1}, text),), ending


def test_unclosed_call_cut_by_the_token_budget_is_malformed() -> None:
    text = 'ok <tool_call>\n{"name": "f", "argum'
    [item] = parse_hermes(text).items
    assert isinstance(item, MalformedCall)
    assert item.reason.startswith("unclosed tool call with incomplete JSON")
    assert item.text == text[3:]


def test_a_call_opened_inside_another_ends_the_first() -> None:
    first = '<tool_call>{"name": "a"}'
    second = block('{"name": "b"}')
    parsed = parse_hermes(first + second)
    assert [(type(i).__name__, i.text) for i in parsed.items] == [
        ("ToolCall", first),
        ("ToolCall", second),
    ]


def test_calls_drafted_while_thinking_are_not_calls() -> None:
    draft = block('{"name": "draft"}')
    final = block('{"name": "final"}')
    parsed = parse_hermes(f"<think>maybe {draft}</think>\n{final}")
    assert [c.name for c in parsed.calls] == ["final"]


def test_a_stray_closing_tag_is_ignored() -> None:
    assert parse_hermes("text </tool_call> more").items == ()


def test_registry_by_name() -> None:
    assert get_tool_parser("hermes") is parse_hermes
    with pytest.raises(KeyError, match=r"unknown tool parser 'nope'; known: .*hermes"):
        get_tool_parser("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_tool_parser("hermes")(parse_hermes)
    assert TOOL_PARSERS["hermes"] is parse_hermes
