"""The ``env:`` section loaded and checked: every problem one line naming the key; a chat
template with tool support accepted, one without refused."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rlfleet.common.env_config import EnvConfig
from rlfleet.envs.loading import (
    EnvConfigError,
    EnvironmentFactory,
    check_environment,
    check_template_supports_tools,
    load_environment_factory,
)
from rlfleet.envs.protocol import Step
from rlfleet.envs.tools import ToolEnvironment

USER_MODULE = "rlf_user_envs"
USER_CODE = '''
from typing import Any

from rlfleet.envs.protocol import Step

CLOSED = []


class Echo:
    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix

    def reset(self, row: dict[str, Any], seed: int) -> None:
        return None

    def step(self, action: str) -> Step:
        return Step(observation=self.prefix + action, done=True)


class NoStep:
    def reset(self, row, seed):
        return None


class Calc:
    """Tools."""

    def __init__(self, offset: int = 0) -> None:
        if offset < 0:
            raise ValueError("offset must be >= 0\\nsecond line")
        self.offset = offset

    def add(self, a: int, b: int) -> int:
        """Add two numbers."""
        return a + b + self.offset

    async def close(self) -> None:
        CLOSED.append(self.offset)


class Undocumented:
    def add(self, a: int, b: int) -> int:
        return a + b


class NoTools:
    def _private(self) -> None:
        """Not a tool."""


def not_a_class():
    return None
'''


@pytest.fixture(scope="module", autouse=True)
def user_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A user's module of environments, importable the way a job imports it."""
    directory = tmp_path_factory.mktemp("user")
    (directory / f"{USER_MODULE}.py").write_text(USER_CODE)
    (directory / "rlf_broken_envs.py").write_text("import no_such_package_xyz\n")
    sys.path.insert(0, str(directory))
    yield
    sys.path.remove(str(directory))
    for name in (USER_MODULE, "rlf_broken_envs"):
        sys.modules.pop(name, None)


def env(**fields: Any) -> EnvConfig:
    return EnvConfig(**fields)


def refusal(config: EnvConfig) -> str:
    with pytest.raises(EnvConfigError) as raised:
        check_environment(config)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_an_environment_loads_one_instance_per_call() -> None:
    config = env(environment=f"{USER_MODULE}:Echo", kwargs={"prefix": "> "})
    assert check_environment(config) is None
    factory = load_environment_factory(config)
    first, second = factory(), factory()
    assert first is not second
    assert first.step("hi") == Step(observation="> hi", done=True)


def test_tools_load_as_a_tool_environment() -> None:
    config = env(tools=f"{USER_MODULE}:Calc", kwargs={"offset": 5})
    [schema] = check_environment(config)
    assert schema["function"]["name"] == "add"
    closed = sys.modules[USER_MODULE].CLOSED
    assert closed == [5]  # the check's instance was closed, its async close awaited
    factory = load_environment_factory(config)
    assert factory == EnvironmentFactory(sys.modules[USER_MODULE].Calc, {"offset": 5}, "hermes")
    environment = factory()
    assert isinstance(environment, ToolEnvironment)
    step = asyncio.run(
        environment.step('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>')
    )
    assert step.observation == [{"role": "tool", "name": "add", "content": "8"}]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"environment": "rlf_missing_module:Env"},
            "env.environment: cannot import 'rlf_missing_module:Env' (ModuleNotFoundError: No "
            "module named 'rlf_missing_module')",
        ),
        (
            {"environment": "rlf_broken_envs:Env"},
            "env.environment: cannot import 'rlf_broken_envs:Env' (ModuleNotFoundError: No "
            "module named 'no_such_package_xyz')",
        ),
        (
            {"tools": f"{USER_MODULE}:Missing"},
            f"env.tools: cannot import '{USER_MODULE}:Missing' (module '{USER_MODULE}' has no "
            "attribute 'Missing')",
        ),
        (
            {"environment": "Echo"},
            "env.environment: 'Echo' must look like 'package.module:Class'",
        ),
        (
            {"environment": f"{USER_MODULE}:not_a_class"},
            f"env.environment: {USER_MODULE}:not_a_class is a function, not a class",
        ),
        (
            {"environment": f"{USER_MODULE}:NoStep"},
            f"env.environment: {USER_MODULE}:NoStep has no step(action) method; an environment "
            "needs reset(row, seed) and step(action)",
        ),
        (
            {"tools": f"{USER_MODULE}:Undocumented"},
            "env.tools: Undocumented.add has no docstring; a tool's docstring is its description "
            "for the model",
        ),
        (
            {"tools": f"{USER_MODULE}:NoTools"},
            f"env.tools: {USER_MODULE}:NoTools has no tools (public methods other than reset "
            "and close)",
        ),
        (
            {"tools": f"{USER_MODULE}:Calc", "tool_parser": "xml"},
            "env.tool_parser: unknown tool parser 'xml'; known: hermes",
        ),
        (
            {"tools": f"{USER_MODULE}:Calc", "kwargs": {"offset": -1}},
            f"env.kwargs: {USER_MODULE}:Calc(**env.kwargs) raised ValueError: offset must be "
            ">= 0 (env.kwargs keys: offset)",
        ),
        (
            {"environment": f"{USER_MODULE}:Echo", "kwargs": {"prefx": "> "}},
            f"env.kwargs: {USER_MODULE}:Echo(**env.kwargs) raised TypeError: Echo.__init__() got "
            "an unexpected keyword argument 'prefx' (env.kwargs keys: prefx)",
        ),
    ],
)
def test_each_problem_is_one_line_naming_the_key(fields: dict[str, Any], message: str) -> None:
    assert refusal(env(**fields)) == message


def test_the_actor_side_loader_refuses_alike() -> None:
    with pytest.raises(EnvConfigError, match=r"^env.environment: .*NoStep has no step\(action\)"):
        load_environment_factory(env(environment=f"{USER_MODULE}:NoStep"))


QWEN_STYLE_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n\n<tools>"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags.<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\n<tool_response>\n' + message['content'] + '\n</tool_response>"
    "<|im_end|>\n' }}"
    "{%- else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)
"""Qwen2.5's way of giving tools (a system turn listing their JSON), cut to the minimum."""


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    from rlfleet.tasks.tiny_model import build_tiny_model

    model_dir = build_tiny_model(tmp_path_factory.mktemp("chat-model"), chat_template=True)
    return AutoTokenizer.from_pretrained(model_dir)


def calc_schemas() -> list[dict[str, Any]]:
    schemas = check_environment(env(tools=f"{USER_MODULE}:Calc"))
    assert schemas is not None
    return schemas


def test_a_template_with_tool_support_is_accepted(tokenizer: Any) -> None:
    tokenizer.chat_template = QWEN_STYLE_TEMPLATE
    check_template_supports_tools(tokenizer, Path("/models/qwen"), calc_schemas())


def test_a_template_without_tool_support_is_refused(tokenizer: Any) -> None:
    from rlfleet.tasks.tiny_model import CHAT_TEMPLATE

    tokenizer.chat_template = CHAT_TEMPLATE
    with pytest.raises(EnvConfigError) as raised:
        check_template_supports_tools(tokenizer, "/models/plain", calc_schemas())
    assert str(raised.value) == (
        "env.tools: the chat template of /models/plain does not support tools (it ignores "
        "tools=); use a model whose chat template renders tools"
    )


def test_a_tokenizer_without_a_template_is_refused(tokenizer: Any) -> None:
    tokenizer.chat_template = None
    with pytest.raises(EnvConfigError) as raised:
        check_template_supports_tools(tokenizer, "/models/base", calc_schemas())
    assert str(raised.value) == (
        "env.tools: the tokenizer of /models/base has no chat template to give the tools to; "
        "use a model whose chat template supports tools"
    )


def test_a_template_that_fails_on_tools_is_refused(tokenizer: Any) -> None:
    tokenizer.chat_template = "{{ raise_exception('tools are not supported') if tools }}"
    with pytest.raises(EnvConfigError) as raised:
        check_template_supports_tools(tokenizer, "/models/strict", calc_schemas())
    message = str(raised.value)
    assert message.startswith("env.tools: the chat template of /models/strict cannot render")
    assert "tools are not supported" in message and "\n" not in message
