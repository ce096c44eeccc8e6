"""The start-up trace (``RLFLEET_STARTUP_TRACE``): off by default, one line per milestone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlfleet.common import startup_trace


def test_without_the_variable_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv(startup_trace.TRACE_VARIABLE, raising=False)
    monkeypatch.chdir(tmp_path)
    startup_trace.mark("imports done")
    assert not startup_trace.enabled()
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr() == ("", "")


def test_each_process_appends_its_milestones_with_time_pid_and_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trace = tmp_path / "trace"
    monkeypatch.setenv(startup_trace.TRACE_VARIABLE, str(trace))
    startup_trace.mark("checks done")
    child = "from rlfleet.common import startup_trace; startup_trace.mark('actor ready')"
    subprocess.run([sys.executable, "-c", child], check=True, env=os.environ.copy())
    startup_trace.mark("first dispatch (generator)")
    startup_trace.mark("an actor began", at=1.5)  # marked afterwards: no CPU time of its own

    lines = startup_trace.read(trace)
    assert [line[3] for line in lines] == [
        "an actor began",
        "checks done",
        "actor ready",
        "first dispatch (generator)",
    ]
    assert lines[0][:3] == (1.5, os.getpid(), -1.0)
    pids = [pid for _, pid, _, _ in lines[1:]]
    assert pids[0] == pids[2] == os.getpid() != pids[1]
    assert all(cpu > 0 for _, _, cpu, _ in lines[1:])


def test_1_prints_the_milestones_to_stderr(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv(startup_trace.TRACE_VARIABLE, "1")
    startup_trace.mark("ray.init done")
    err = capsys.readouterr().err
    assert err.startswith("rlfleet startup: ") and err.endswith(" ray.init done\n")


def test_the_module_imports_nothing_heavy() -> None:
    code = (
        "import sys; from rlfleet.common import startup_trace; "
        "print(sorted({'torch', 'ray', 'pydantic', 'transformers'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
