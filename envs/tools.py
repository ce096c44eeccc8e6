"""A class of tools as an environment (``env.tools: "module:Class"``).

The tools are the class's public methods (not starting with ``_``; the lifecycle hooks
``reset`` and ``close`` excepted), each type-hinted and documented: its docstring's first
paragraph is the tool's description and its Google-style ``Args:`` lines describe the
parameters. ``tool_schemas`` gives them in the OpenAI function-tool format that chat templates
take as ``tools=``. The schemas and the validation of the model's arguments come from the same
pydantic model of each signature, so what the model is shown is what is accepted.

``ToolEnvironment`` runs the calls of each turn (envs/parsers.py reads them): each result is a
``tool`` message; a malformed call, an unknown tool, bad arguments and a tool that raises are
``tool`` messages starting with ``error:``, counted in ``Step.info``, never an exception. A tool
may also report its own failure as a result starting with ``error:`` (the sandboxed ``python``
tool does, with the code's output after it): that counts as a tool error too. A turn without
any call ends the trajectory.

Its ``reset`` and ``step`` are coroutines whether the tools are plain or ``async``: the
environment actor awaits them, an ``async`` tool is awaited, and a plain one runs in a
worker thread (asyncio's default executor; an actor holding many trajectories gives its loop
a larger one), so a slow tool holds up neither the other trajectories of the actor nor its
``env.step_timeout_s``. The calls of one turn run one after the other, in the order written.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import warnings
from dataclasses import dataclass
from functools import cache
from typing import Any, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic.json_schema import GenerateJsonSchema

from rlfleet.common.errors import error_line
from rlfleet.envs.parsers import MalformedCall, ToolCall, ToolParser, get_tool_parser
from rlfleet.envs.protocol import Message, Observation, Step

LIFECYCLE_HOOKS = ("reset", "close")

ERROR_PREFIX = "error:"
"""How a tool message that reports a failure starts (and a tool's own result that does)."""
"""Public methods of a tool class that are not tools: ``reset(row, seed)`` is called at the
start of each trajectory, ``close()`` at its end (both optional)."""

_ARGS_HEADER = re.compile(r"^(Args|Arguments|Parameters):\s*$")
_ARG_LINE = re.compile(r"^\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_ARGUMENTS_CONFIG = ConfigDict(extra="forbid", strict=True, protected_namespaces=())
"""The model's arguments as JSON gives them: no coercion ("3" is not an int), no unknown
names."""


class ToolDefinitionError(ValueError):
    """A tool class whose tools cannot be described to the model; the message is one line
    naming the class and the method."""


@dataclass(frozen=True)
class ToolSpec:
    """One tool: its method's name, its schema, and the pydantic model of its arguments."""

    name: str
    schema: dict[str, Any]
    arguments: type[BaseModel]


def tool_schemas(tools: object) -> list[dict[str, Any]]:
    """The OpenAI function-tool schemas of a tool class (or of an instance's class), in the
    order the methods are defined; a ``ToolDefinitionError`` for a method that lacks type hints
    or a docstring."""
    return [spec.schema for spec in tool_specs(_class_of(tools))]


@cache
def tool_specs(cls: type) -> tuple[ToolSpec, ...]:
    """Every tool of ``cls`` with its schema and arguments model, built once per class (one
    environment per trajectory reuses them)."""
    return tuple(_tool_spec(cls, name, function, skip) for name, function, skip in _methods(cls))


def _class_of(tools: object) -> type:
    return tools if isinstance(tools, type) else type(tools)


def _methods(cls: type) -> list[tuple[str, Any, int]]:
    """``(name, function, leading parameters to skip)`` of each public method, base classes'
    first, in definition order; ``self`` and ``cls`` are skipped, properties and attributes are
    not tools."""
    found: dict[str, tuple[Any, int]] = {}
    for klass in reversed(cls.__mro__[:-1]):
        for name in vars(klass):
            if name.startswith("_") or name in LIFECYCLE_HOOKS:
                continue
            raw = inspect.getattr_static(cls, name)
            if isinstance(raw, staticmethod):
                found[name] = (raw.__func__, 0)
            elif isinstance(raw, classmethod):
                found[name] = (raw.__func__, 1)
            elif inspect.isfunction(raw):
                found[name] = (raw, 1)
    return [(name, function, skip) for name, (function, skip) in found.items()]


def _tool_spec(cls: type, name: str, function: Any, skip: int) -> ToolSpec:
    where = f"{cls.__qualname__}.{name}"
    description, parameter_docs = split_docstring(inspect.getdoc(function) or "")
    if not description:
        raise ToolDefinitionError(
            f"{where} has no docstring; a tool's docstring is its description for the model"
        )
    fields = _fields(where, function, skip, parameter_docs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a parameter named like a BaseModel attribute
            model = create_model(name, __config__=_ARGUMENTS_CONFIG, **fields)
            parameters = model.model_json_schema(schema_generator=_WithoutTitles)
    except Exception as error:
        raise ToolDefinitionError(
            f"{where}: its parameters cannot be described as JSON ({error_line(error)})"
        ) from error
    schema = {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": _conventional(parameters),
        },
    }
    return ToolSpec(name, schema, model)


def _fields(
    where: str, function: Any, skip: int, docs: dict[str, str]
) -> dict[str, tuple[Any, Any]]:
    """Each parameter as a pydantic field: its type hint, its default (none: required) and its
    ``Args:`` description."""
    try:
        hints = get_type_hints(function)
    except Exception as error:
        raise ToolDefinitionError(
            f"{where}: its type hints cannot be resolved ({error_line(error)})"
        ) from error
    fields = {}
    for parameter in list(inspect.signature(function).parameters.values())[skip:]:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise ToolDefinitionError(
                f"{where} takes *{parameter.name}; a tool's parameters must each be named"
            )
        if parameter.name not in hints:
            raise ToolDefinitionError(
                f"{where} has no type hint for {parameter.name!r}; the hints are the tool's schema"
            )
        default = ... if parameter.default is parameter.empty else parameter.default
        info = Field(default, description=docs.get(parameter.name))
        fields[parameter.name] = (hints[parameter.name], info)
    return fields


def _conventional(parameters: dict[str, Any]) -> dict[str, Any]:
    """Pydantic's schema of the arguments laid out as transformers' ``get_json_schema`` and
    OpenAI's examples lay it out (what chat models saw in training): ``type``, ``properties``,
    ``required``; each property's ``type`` first and ``description`` last; no model title and no
    ``additionalProperties`` (unknown arguments are still refused when a call is checked)."""
    properties = {
        name: _type_first(dict(schema)) for name, schema in parameters["properties"].items()
    }
    laid_out: dict[str, Any] = {"type": "object", "properties": properties}
    if parameters.get("required"):
        laid_out["required"] = parameters["required"]
    if "$defs" in parameters:
        laid_out["$defs"] = parameters["$defs"]
    return laid_out


def _type_first(schema: dict[str, Any]) -> dict[str, Any]:
    description = schema.pop("description", None)
    ordered = {"type": schema.pop("type")} if "type" in schema else {}
    ordered.update(schema)
    if description is not None:
        ordered["description"] = description
    return ordered


class _WithoutTitles(GenerateJsonSchema):
    """Pydantic's JSON schema less the per-field titles (the parameter's name again)."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


def split_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """The description (the first paragraph, on one line) and the parameter descriptions of the
    ``Args:`` section of a cleaned docstring (``inspect.getdoc``)."""
    lines = doc.splitlines()
    description = []
    for line in lines:
        if not line.strip() or _ARGS_HEADER.match(line.strip()):
            break
        description.append(line.strip())
    return " ".join(description), _args_section(lines)


def _args_section(lines: list[str]) -> dict[str, str]:
    """Parameter descriptions from ``name (type): text`` lines under ``Args:``; a more indented
    line continues the one before, a less indented one ends the section."""
    start = next((i + 1 for i, line in enumerate(lines) if _ARGS_HEADER.match(line.strip())), None)
    if start is None:
        return {}
    docs: dict[str, str] = {}
    indent, current = None, None
    for line in lines[start:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        if depth < indent or depth == 0:
            break
        match = _ARG_LINE.match(line.strip())
        if depth == indent and match:
            current = match.group(1)
            docs[current] = match.group(2).strip()
        elif current is not None:
            docs[current] = f"{docs[current]} {line.strip()}".strip()
    return docs


@dataclass
class _Counts:
    """A step's counters, the ``Step.info`` of the turn."""

    calls: dict[str, int]
    errors: dict[str, int]
    malformed: int = 0

    def info(self) -> dict[str, Any]:
        return {
            "tool_calls": self.calls,
            "tool_errors": self.errors,
            "malformed_tool_calls": self.malformed,
        }


class ToolEnvironment:
    """The environment of a tool object: the model calls its tools until a turn has no call.

    ``parser`` is a parser or its name in envs/parsers.py's registry. ``schemas`` are what the
    chat template is given (``tools=``) when the prompt is rendered."""

    def __init__(self, tools: object, parser: ToolParser | str = "hermes") -> None:
        self.tools = tools
        self.parser = get_tool_parser(parser) if isinstance(parser, str) else parser
        self.specs = {spec.name: spec for spec in tool_specs(type(tools))}

    @property
    def schemas(self) -> list[dict[str, Any]]:
        return [spec.schema for spec in self.specs.values()]

    async def reset(self, row: dict[str, Any], seed: int) -> Observation | None:
        """Calls the tool object's ``reset(row, seed)`` when it has one and returns what it
        returns (usually None: the dataset row's prompt)."""
        hook = getattr(self.tools, "reset", None)
        return None if hook is None else await _run(hook, row, seed)

    async def step(self, action: str) -> Step:
        """Runs every call of ``action``; their results are the observation. No call: done."""
        parsed = self.parser(action)
        counts = _Counts(calls={}, errors={})
        if not parsed.items:
            return Step(done=True, info=counts.info())
        messages = [await self._answer(item, counts) for item in parsed.items]
        return Step(observation=messages, info=counts.info())

    def close(self) -> Any:
        """Calls the tool object's ``close()`` when it has one (the trajectory is over) and
        returns what it returns: a plain method, so a caller that closes without an event loop
        closes plain hooks; an ``async`` hook's coroutine is the caller's to await."""
        hook = getattr(self.tools, "close", None)
        return None if hook is None else hook()

    async def _answer(self, item: ToolCall | MalformedCall, counts: _Counts) -> Message:
        """The ``tool`` message answering one call, counted."""
        if isinstance(item, MalformedCall):
            counts.malformed += 1
            return _tool_message(item.name, f"error: malformed tool call: {item.reason}")
        spec = self.specs.get(item.name)
        if spec is None:
            counts.malformed += 1
            known = ", ".join(self.specs) or "none"
            return _tool_message(item.name, f"error: unknown tool {item.name!r}; tools: {known}")
        counts.calls[item.name] = counts.calls.get(item.name, 0) + 1
        try:
            result = await self._call(spec, item.arguments)
        except _BadArguments as error:
            content = f"error: bad arguments for {item.name}: {error}"
        except Exception as error:
            content = f"error: {error_line(error)}"
        else:
            content = tool_result_text(result)
            if not content.startswith(ERROR_PREFIX):
                return _tool_message(item.name, content)
        counts.errors[item.name] = counts.errors.get(item.name, 0) + 1
        return _tool_message(item.name, content)

    async def _call(self, spec: ToolSpec, arguments: dict[str, Any]) -> Any:
        try:
            validated = spec.arguments.model_validate(arguments)
        except ValidationError as error:
            raise _BadArguments(_argument_problems(error)) from None
        given = {name: getattr(validated, name) for name in validated.model_fields_set}
        return await _run(getattr(self.tools, spec.name), **given)


class _BadArguments(Exception):
    """Arguments the tool's signature refuses (the model's mistake, not the tool's)."""


async def _run(function: Any, *args: Any, **kwargs: Any) -> Any:
    """``function``'s result: awaited when it is a coroutine function, else from a worker
    thread."""
    if inspect.iscoroutinefunction(function):
        return await function(*args, **kwargs)
    result = await asyncio.to_thread(function, *args, **kwargs)
    return await result if inspect.isawaitable(result) else result


def _argument_problems(error: ValidationError) -> str:
    """Each refused argument and why, on one line: ``b: missing; z: unexpected argument``."""
    problems = []
    for problem in error.errors(include_url=False):
        where = ".".join(str(part) for part in problem["loc"]) or "arguments"
        reason = {"missing": "missing", "extra_forbidden": "unexpected argument"}.get(
            problem["type"], problem["msg"]
        )
        problems.append(f"{where}: {reason}")
    return "; ".join(problems)


def tool_result_text(result: Any) -> str:
    """A tool's result as the ``tool`` message's content: a string as it is, None as empty,
    a list or dict as JSON (what models are trained to read), anything else by ``str``."""
    if isinstance(result, str):
        return result
    if result is None:
        return ""
    if isinstance(result, (dict, list, tuple)):
        try:
            return json.dumps(result, ensure_ascii=False)
        except (TypeError, ValueError):
            pass
    return str(result)


def _tool_message(name: str | None, content: str) -> Message:
    """A ``tool`` message; without ``name`` when the call's name could not be read."""
    if name is None:
        return {"role": "tool", "content": content}
    return {"role": "tool", "name": name, "content": content}
