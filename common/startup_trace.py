"""Start-up milestones of a job, for bench/startup.py: off unless ``RLFLEET_STARTUP_TRACE`` is set.

``RLFLEET_STARTUP_TRACE=1`` prints each milestone to this process's stderr; any other value is
a file that every process of the job (the driver, and the actors of a local Ray instance, which
inherit the driver's environment) appends its milestones to, one line each:
``<wall-clock seconds> <pid> <process CPU seconds> <milestone>``. Wall-clock time, since the
lines of several processes are compared; the process's CPU time (user and system) so far, since
on a loaded machine it says more than the wall-clock time. Off, ``mark`` reads one environment
variable: nothing else is imported or written.
"""

from __future__ import annotations

import os
import sys
import time

TRACE_VARIABLE = "RLFLEET_STARTUP_TRACE"


def enabled() -> bool:
    return bool(os.environ.get(TRACE_VARIABLE))


def mark(milestone: str, at: float | None = None) -> None:
    """Records ``milestone`` as reached now (``at``: at that ``time.time()`` instead), when
    tracing is on."""
    target = os.environ.get(TRACE_VARIABLE)
    if not target:
        return
    cpu = -1.0 if at is not None else time.process_time()  # -1: marked afterwards
    line = f"{time.time() if at is None else at:.4f} {os.getpid()} {cpu:.3f} {milestone}\n"
    if target == "1":
        sys.stderr.write(f"rlfleet startup: {line}")
        return
    with open(target, "a") as trace:  # one short append: lines of processes do not interleave
        trace.write(line)


def read(path: str | os.PathLike[str]) -> list[tuple[float, int, float, str]]:
    """The milestones in a trace file: (wall-clock seconds, pid, process CPU seconds or -1,
    milestone), in time order."""
    lines = []
    with open(path) as trace:
        for line in trace:
            at, pid, cpu, milestone = line.rstrip("\n").split(" ", 3)
            lines.append((float(at), int(pid), float(cpu), milestone))
    return sorted(lines)
