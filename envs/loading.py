"""The ``env:`` section turned into environments: one fresh instance per trajectory, and the
checks the driver makes before Ray starts.

``check_environment`` imports the class, checks its methods (an environment's, or a tool
class's tools and their schemas), the tool parser's name and the constructor with
``env.kwargs``, and returns the tool schemas; ``check_template_supports_tools`` refuses a
model whose chat template ignores ``tools=``. Each problem is an ``EnvConfigError`` of one line
starting with the config key to change. ``load_environment_factory`` is what an environment
actor calls: it makes the environments and raises the same errors.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlfleet.common.env_config import EnvConfig
from rlfleet.common.errors import error_line
from rlfleet.envs import skyrl_gym as skyrl_adapter
from rlfleet.envs.agents import AgentSpecError, load_agent
from rlfleet.envs.parsers import get_tool_parser
from rlfleet.envs.protocol import REQUIRED_METHODS, Environment
from rlfleet.envs.tools import ToolDefinitionError, ToolEnvironment, tool_schemas

METHOD_SIGNATURES = {"reset": "reset(row, seed)", "step": "step(action)"}
"""How the messages write each required method of an environment."""


class EnvConfigError(ValueError):
    """An ``env:`` section that cannot run; one line, starting with the key to change."""


@dataclass(frozen=True)
class EnvironmentFactory:
    """Makes one environment per trajectory: ``cls(**kwargs)``, or a ``ToolEnvironment``
    around it when ``tool_parser`` is given. Plain data, so it pickles to an actor."""

    cls: type
    kwargs: dict[str, Any] = field(default_factory=dict)
    tool_parser: str | None = None

    def __call__(self) -> Environment:
        instance = self.cls(**self.kwargs)
        if self.tool_parser is None:
            return instance
        return ToolEnvironment(instance, self.tool_parser)


def load_environment_factory(config: EnvConfig) -> EnvironmentFactory:
    """The factory of ``config``'s environments (its class imported and checked; a
    ``skyrl_gym`` text environment wrapped in envs/skyrl_gym.py's adapter); an
    ``EnvConfigError`` as ``check_environment`` gives it otherwise."""
    key, spec = source_key(config)
    cls = import_class(key, spec)
    if config.tools is None:
        if skyrl_adapter.is_text_env(cls):
            return skyrl_gym_factory(key, spec, cls, config)
        check_environment_methods(key, spec, cls)
        return EnvironmentFactory(cls, dict(config.kwargs))
    check_tool_parser(config.tool_parser)
    checked_tool_schemas(spec, cls)
    return EnvironmentFactory(cls, dict(config.kwargs), config.tool_parser)


def check_environment(config: EnvConfig) -> list[dict[str, Any]] | None:
    """Everything about ``env:`` that can fail before Ray starts, each problem one line: the
    class imports, has the methods an environment needs (or tools with schemas that serialize),
    the tool parser is known, and the class can be built with ``env.kwargs`` (once, then closed).
    Returns the tool schemas (None for an environment, which gives none). An agent function
    (``env.agent``) is imported and checked to be ``async``."""
    if config.agent is not None:
        try:
            load_agent(config.agent)
        except AgentSpecError as exc:
            raise EnvConfigError(str(exc)) from None
        return None
    factory = load_environment_factory(config)
    _, spec = source_key(config)
    check_constructor(spec, factory)
    return None if factory.tool_parser is None else tool_schemas(factory.cls)


def tool_schemas_of(config: EnvConfig | None) -> list[dict[str, Any]] | None:
    """The tools' JSON schemas of a job's ``env:`` (None without tools, or without ``env:``)."""
    if config is None or config.tools is None:
        return None
    return tool_schemas(load_environment_factory(config).cls)


def source_key(config: EnvConfig) -> tuple[str, str]:
    """The key (``env.environment`` or ``env.tools``) and the ``"module:Class"`` it gives."""
    if config.tools is not None:
        return "env.tools", config.tools
    assert config.environment is not None  # EnvConfig holds exactly one of the two
    return "env.environment", config.environment


def import_class(key: str, spec: str) -> type:
    """The class ``spec`` (``"package.module:Class"``) names."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise EnvConfigError(f"{key}: {spec!r} must look like 'package.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as error:  # a user's module may exit while importing
        raise EnvConfigError(f"{key}: cannot import {spec!r} ({error_line(error)})") from error
    cls = getattr(module, attribute, None)
    if cls is None:
        raise EnvConfigError(
            f"{key}: cannot import {spec!r} (module {module_name!r} has no attribute {attribute!r})"
        )
    if not isinstance(cls, type):
        raise EnvConfigError(f"{key}: {spec} is a {type(cls).__name__}, not a class")
    return cls


def check_environment_methods(key: str, spec: str, cls: type) -> None:
    """``cls`` has every method of the Environment protocol."""
    for name in REQUIRED_METHODS:
        if not callable(getattr(cls, name, None)):
            needs = " and ".join(METHOD_SIGNATURES[method] for method in REQUIRED_METHODS)
            raise EnvConfigError(
                f"{key}: {spec} has no {METHOD_SIGNATURES[name]} method; an environment "
                f"needs {needs}"
            )


def skyrl_gym_factory(key: str, spec: str, cls: type, config: EnvConfig) -> EnvironmentFactory:
    """A ``skyrl_gym`` text environment behind the adapter (envs/skyrl_gym.py): each one built
    in ``reset`` from the row, ``env.kwargs`` as its ``env_config``."""
    if not skyrl_adapter.overrides_step(cls):
        raise EnvConfigError(
            f"{key}: {spec} is a skyrl_gym BaseTextEnv without its own step(action) method"
        )
    kwargs = {"env_class": cls, "env_config": dict(config.kwargs), "max_turns": config.max_turns}
    return EnvironmentFactory(skyrl_adapter.SkyRLGymEnvironment, kwargs)


def check_tool_parser(name: str) -> None:
    """``name`` is a registered tool parser."""
    try:
        get_tool_parser(name)
    except KeyError as error:
        raise EnvConfigError(f"env.tool_parser: {error.args[0]}") from None


def checked_tool_schemas(spec: str, cls: type) -> list[dict[str, Any]]:
    """The tool schemas of ``cls``: at least one tool, each described, all JSON."""
    try:
        schemas = tool_schemas(cls)
    except ToolDefinitionError as error:
        raise EnvConfigError(f"env.tools: {error}") from error
    if not schemas:
        raise EnvConfigError(
            f"env.tools: {spec} has no tools (public methods other than reset and close)"
        )
    try:
        json.dumps(schemas)
    except (TypeError, ValueError) as error:
        raise EnvConfigError(
            f"env.tools: the tool schemas of {spec} cannot be serialized ({error_line(error)})"
        ) from error
    return schemas


def check_constructor(spec: str, factory: EnvironmentFactory) -> None:
    """One instance is built with ``env.kwargs`` (and closed again, when it has ``close``)."""
    try:
        instance = factory.cls(**factory.kwargs)
    except Exception as error:
        keys = ", ".join(sorted(factory.kwargs)) or "none"
        raise EnvConfigError(
            f"env.kwargs: {spec}(**env.kwargs) raised {error_line(error)} (env.kwargs keys: {keys})"
        ) from error
    _close(instance)


def _close(instance: object) -> None:
    """Calls ``instance.close()`` when it has one, running it to the end when it is a
    coroutine (the driver has no running event loop when it checks)."""
    close = getattr(instance, "close", None)
    if not callable(close):
        return
    result = close()
    if inspect.isawaitable(result):
        asyncio.run(_awaited(result))


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


PROBE_MESSAGES = [{"role": "user", "content": "hello"}]
"""The conversation rendered to see whether the chat template shows the tools."""


def check_template_supports_tools(
    tokenizer: Any, model_dir: str | Path, schemas: list[dict[str, Any]]
) -> None:
    """The tokenizer's chat template renders ``schemas``: a one-message conversation rendered
    with ``tools=`` differs from one without and names every tool (a template without tool
    support ignores the argument, and the model would never learn of its tools)."""
    if not getattr(tokenizer, "chat_template", None):
        raise EnvConfigError(
            f"env.tools: the tokenizer of {model_dir} has no chat template to give the tools "
            "to; use a model whose chat template supports tools"
        )
    try:
        plain = tokenizer.apply_chat_template(
            PROBE_MESSAGES, tokenize=False, add_generation_prompt=True
        )
        text = tokenizer.apply_chat_template(
            PROBE_MESSAGES, tools=schemas, tokenize=False, add_generation_prompt=True
        )
    except Exception as error:
        raise EnvConfigError(
            f"env.tools: the chat template of {model_dir} cannot render the tools "
            f"({error_line(error)})"
        ) from error
    missing = [name for name in _tool_names(schemas) if name not in text]
    if text == plain or missing:
        raise EnvConfigError(
            f"env.tools: the chat template of {model_dir} does not support tools (it ignores "
            "tools=); use a model whose chat template renders tools"
        )


def _tool_names(schemas: list[dict[str, Any]]) -> list[str]:
    return [schema["function"]["name"] for schema in schemas]
