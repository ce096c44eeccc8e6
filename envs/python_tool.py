"""The built-in ``python`` tool: model-written code run in a sandbox (envs/sandbox.py).

``env.tools: "rlfleet.envs.python_tool:PythonTool"``; its ``env.kwargs`` are ``sandbox``
(``bubblewrap``, the default, or ``none``: an explicit opt-out that runs the code in a plain
subprocess with the network and the whole file system reachable) and the limits of
``SandboxLimits``. The constructor refuses to start, with one line, where bubblewrap cannot
run, so a job never runs model-written code unsandboxed by accident.

Errors go back as the tool's text, not as exceptions: a result starting with ``error:`` names
what happened (the time, CPU, memory, process or output limit, or the exception the code
raised, a blocked network connection or write included) and is followed by what the code
printed, traceback included, so the model can see which line failed. (An exception would reach
the model as its first line only.)
"""

from __future__ import annotations

import logging
import signal

from rlfleet.envs.sandbox import (
    SandboxKind,
    SandboxLimits,
    SandboxResult,
    check_sandbox,
    run_python,
)

logger = logging.getLogger(__name__)
_warned_unsandboxed = False


class PythonTool:
    """One trajectory's ``python`` tool. Each call runs in a fresh sandbox: nothing carries
    over between calls (no state, no files). ``wall_s`` should stay below
    ``env.step_timeout_s``, or the step's deadline ends the trajectory first."""

    def __init__(
        self,
        sandbox: SandboxKind = "bubblewrap",
        cpu_s: float = 5.0,
        wall_s: float = 10.0,
        memory_mb: int = 512,
        max_processes: int = 8,
        max_output_bytes: int = 16_384,
        tmp_mb: int = 64,
        bwrap: str = "bwrap",
    ) -> None:
        check_sandbox(sandbox, bwrap)
        self._sandbox: SandboxKind = sandbox
        self._bwrap = bwrap
        self._limits = SandboxLimits(
            cpu_s=cpu_s,
            wall_s=wall_s,
            memory_mb=memory_mb,
            max_processes=max_processes,
            max_output_bytes=max_output_bytes,
            tmp_mb=tmp_mb,
        )
        if sandbox == "none":
            _warn_unsandboxed()

    def python(self, code: str) -> str:
        """Run a Python 3 program and return what it printed (stdout, then stderr). Each call
        is a new process: print every value you need; variables and files do not carry over
        between calls. There is no network; only /tmp (the working directory) is writable;
        time, memory, processes and output are limited. A result starting with "error:" says
        what went wrong.

        Args:
            code: The whole program, for example: print(sum(range(10)))
        """
        result = run_python(code, self._limits, self._sandbox, bwrap=self._bwrap)
        return result_text(result, self._limits)


def result_text(result: SandboxResult, limits: SandboxLimits) -> str:
    """What the model sees: the output, or ``error: <what happened>`` and then the output."""
    output = _output_text(result)
    problem = _problem(result, limits)
    if problem is None:
        return output or "(no output)"
    return f"error: {problem}" + (f"\n{output}" if output else "")


def _output_text(result: SandboxResult) -> str:
    """stdout alone when there is nothing on stderr; else both, labelled."""
    if not result.stderr:
        return result.stdout
    parts = [f"stdout:\n{result.stdout}"] if result.stdout else []
    return "\n".join([*parts, f"stderr:\n{result.stderr}"])


def _problem(result: SandboxResult, limits: SandboxLimits) -> str | None:
    """One clause naming why the call failed, or None when it did not."""
    killed = result.killed
    if killed == "time":
        return f"the code ran past its {limits.wall_s:g} s time limit and was stopped"
    if killed == "cpu":
        return f"the code used up its {limits.cpu_s:g} s of CPU time and was stopped"
    if killed == "memory":
        return f"the code ran out of memory (its limit is {limits.memory_mb} MB)"
    if killed == "processes":
        return (
            f"the code tried to run more than {limits.max_processes} processes or threads; "
            "the sandbox refused"
        )
    if killed == "output":
        return (
            f"the code printed more than {limits.max_output_bytes} bytes and was stopped "
            "(its output is cut there)"
        )
    if killed == "file_size":
        return f"the code wrote a file larger than {limits.tmp_mb} MB and was stopped"
    if killed is not None:
        return f"the code was killed by {_signal_name(killed)}"
    if result.exit_code:
        raised = _raised(result.stderr)
        exited = f"the code exited with status {result.exit_code}"
        return f"the code raised {raised}" if raised else exited
    return None


def _raised(stderr: str) -> str | None:
    """The exception line of a traceback at the end of ``stderr`` (``OSError: [Errno 30]
    Read-only file system: '/etc/x'``), or None."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    if "Traceback (most recent call last):" not in stderr or not lines:
        return None
    last = lines[-1].strip()
    name = last.split(":", 1)[0]
    return last if name.replace(".", "").replace("_", "").isalnum() else None


def _signal_name(killed: str) -> str:
    """``SIGSEGV`` for ``"signal 11"``; the text as it is otherwise."""
    try:
        return signal.Signals(int(killed.removeprefix("signal "))).name
    except ValueError:
        return killed


def _warn_unsandboxed() -> None:
    """Says once per process that model-written code runs with the host reachable."""
    global _warned_unsandboxed
    if not _warned_unsandboxed:
        _warned_unsandboxed = True
        logger.warning(
            "env.kwargs.sandbox: none: the python tool runs model-written code unsandboxed "
            "(network and file system reachable; only time, memory and output are limited)"
        )
