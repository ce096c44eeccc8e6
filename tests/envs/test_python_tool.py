"""The ``python`` tool as the model meets it: its schema, its output, and every escape attempt
answered with a text starting with ``error:`` that names what happened."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator

import pytest

import rlfleet.envs.python_tool as python_tool
from rlfleet.envs.python_tool import PythonTool
from rlfleet.envs.sandbox import SandboxUnavailable
from rlfleet.envs.tools import ToolEnvironment, tool_schemas

needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None,
    reason="bubblewrap (bwrap) is not installed here; scripts/test.sh installs it",
)
LIMITS = {"cpu_s": 2, "wall_s": 4, "memory_mb": 256, "max_processes": 8, "max_output_bytes": 4096}


@pytest.fixture
def tool() -> PythonTool:
    return PythonTool(**LIMITS)


@pytest.fixture
def listener() -> Iterator[int]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[1]


def test_the_schema_describes_one_python_tool_with_its_code() -> None:
    (schema,) = tool_schemas(PythonTool)
    function = schema["function"]
    assert function["name"] == "python"
    assert function["description"].startswith("Run a Python 3 program and return what it printed")
    assert "no network" in function["description"]
    assert function["parameters"]["required"] == ["code"]
    code = function["parameters"]["properties"]["code"]
    assert code["type"] == "string"
    assert code["description"].startswith("The whole program")


@needs_bwrap
def test_output_comes_back_as_text(tool: PythonTool) -> None:
    assert tool.python("print(sum(range(10)))") == "45\n"
    assert tool.python("x = 1") == "(no output)"
    assert tool.python("import sys\nprint('a')\nsys.stderr.write('b\\n')") == (
        "stdout:\na\n\nstderr:\nb\n"
    )


@needs_bwrap
def test_an_exception_is_an_error_with_its_traceback(tool: PythonTool) -> None:
    text = tool.python("print('start')\n1 / 0")
    assert text.startswith("error: the code raised ZeroDivisionError: division by zero\n")
    assert "stdout:\nstart\n" in text
    assert 'File "<code>", line 2, in <module>' in text


@needs_bwrap
def test_a_nonzero_exit_is_an_error(tool: PythonTool) -> None:
    assert tool.python("import sys\nsys.exit(3)") == "error: the code exited with status 3"


@needs_bwrap
def test_a_network_connection_is_an_error(tool: PythonTool, listener: int) -> None:
    outside = tool.python("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=3)")
    assert outside.startswith("error: the code raised OSError: [Errno 101] Network is unreachable")
    local = tool.python(f"import socket\nsocket.create_connection(('127.0.0.1', {listener}))")
    assert local.startswith("error: the code raised ConnectionRefusedError: [Errno 111]")


@needs_bwrap
@pytest.mark.parametrize("target", ["/etc/sandbox-escape.txt", "/usr/sandbox-escape.txt"])
def test_a_write_outside_tmp_is_an_error(tool: PythonTool, target: str) -> None:
    text = tool.python(f"open({target!r}, 'w').write('x')")
    assert text.startswith("error: the code raised OSError: [Errno 30] Read-only file system")
    assert not os.path.exists(target)


@needs_bwrap
def test_a_fork_bomb_is_an_error(tool: PythonTool) -> None:
    text = tool.python("import os\nwhile True:\n    os.fork()")
    assert text.startswith(
        "error: the code tried to run more than 8 processes or threads; the sandbox refused"
    )


@needs_bwrap
def test_too_many_threads_is_an_error(tool: PythonTool) -> None:
    code = (
        "import threading, time\n"
        "for _ in range(50):\n"
        "    threading.Thread(target=time.sleep, args=(0.5,), daemon=True).start()"
    )
    assert tool.python(code).startswith("error: the code tried to run more than 8 processes")


@needs_bwrap
def test_a_memory_bomb_is_an_error(tool: PythonTool) -> None:
    text = tool.python("x = bytearray(4 * 2**30)")
    assert text.startswith("error: the code ran out of memory (its limit is 256 MB)")


@needs_bwrap
def test_an_endless_loop_is_an_error(tool: PythonTool) -> None:
    started = time.monotonic()
    text = tool.python("while True:\n    pass")
    assert time.monotonic() - started < LIMITS["wall_s"] + 2
    assert text in (
        "error: the code used up its 2 s of CPU time and was stopped",
        "error: the code ran past its 4 s time limit and was stopped",
    )


@needs_bwrap
def test_a_sleep_past_the_time_limit_is_an_error(tool: PythonTool) -> None:
    text = tool.python("import time\nprint('waiting', flush=True)\ntime.sleep(60)")
    assert text == "error: the code ran past its 4 s time limit and was stopped\nwaiting\n"


@needs_bwrap
def test_an_output_flood_is_an_error_with_the_output_cut(tool: PythonTool) -> None:
    text = tool.python("while True:\n    print('x' * 100)")
    first, _, output = text.partition("\n")
    assert (
        first
        == "error: the code printed more than 4096 bytes and was stopped (its output is cut there)"
    )
    assert len(output.encode()) <= 4096 and output.startswith("x" * 100)


@needs_bwrap
def test_a_call_through_the_tool_environment(tool: PythonTool) -> None:
    """The tools layer (envs/tools.py) runs the tool from a worker thread: the answer is a
    ``tool`` message, and an escape is one too, never an exception."""
    environment = ToolEnvironment(tool, "hermes")
    call = '<tool_call>\n{"name": "python", "arguments": {"code": "%s"}}\n</tool_call>'
    step = asyncio.run(environment.step(call % "print(6 * 7)"))
    assert step.observation == [{"role": "tool", "name": "python", "content": "42\n"}]
    step = asyncio.run(environment.step(call % "open('/etc/x', 'w')"))
    assert step.observation[0]["content"].startswith("error: the code raised OSError")


def test_it_refuses_to_start_without_a_sandbox() -> None:
    with pytest.raises(SandboxUnavailable) as caught:
        PythonTool(bwrap="/nonexistent/bwrap")
    assert str(caught.value).startswith(
        "env.kwargs.sandbox: bubblewrap (/nonexistent/bwrap) is not installed or cannot create "
        "namespaces here"
    )
    assert "\n" not in str(caught.value)


def test_none_is_an_explicit_opt_out_that_runs_and_warns_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(python_tool, "_warned_unsandboxed", False)
    with caplog.at_level(logging.WARNING, logger="rlfleet.envs.python_tool"):
        tool = PythonTool(sandbox="none", bwrap="/nonexistent/bwrap", **LIMITS)
        PythonTool(sandbox="none", **LIMITS)
    warnings = [record.getMessage() for record in caplog.records]
    assert warnings == [
        "env.kwargs.sandbox: none: the python tool runs model-written code unsandboxed "
        "(network and file system reachable; only time, memory and output are limited)"
    ]
    assert tool.python("print('unsandboxed')") == "unsandboxed\n"
    assert tool.python("x = bytearray(4 * 2**30)").startswith("error: the code ran out of memory")


def test_bad_limits_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="memory_mb must be a positive number"):
        PythonTool(sandbox="none", memory_mb=0)
