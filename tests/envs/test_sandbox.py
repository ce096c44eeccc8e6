"""The sandbox really runs bubblewrap: each escape a model's code may try is contained, the call
returns within its bound and leaves no process behind. (scripts/test.sh installs bubblewrap;
where it is missing these tests are skipped, saying so.)"""

from __future__ import annotations

import ast
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import rlfleet
from rlfleet.envs.sandbox import (
    SANDBOX_UID_BASE,
    SandboxLimits,
    SandboxResult,
    SandboxUnavailable,
    check_sandbox,
    run_python,
)

needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None,
    reason="bubblewrap (bwrap) is not installed here; scripts/test.sh installs it",
)
FAST = SandboxLimits(cpu_s=2, wall_s=4, memory_mb=256, max_processes=8, max_output_bytes=4096)
REPO_ROOT = Path(rlfleet.__file__).parent
LAUNCHER_MARK = b"exit_memory, exit_processes"
"""A piece of the launcher's command line (``python -c LAUNCHER``): every process of a sandbox,
fork bomb children included, carries it."""


def sandboxed(code: str, limits: SandboxLimits = FAST) -> SandboxResult:
    return run_python(code, limits, "bubblewrap")


def sandbox_processes() -> list[int]:
    """Pids of live sandboxed Python processes (bwrap's own processes excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if LAUNCHER_MARK in b" ".join(argv) and b"bwrap" not in argv[0]:
            found.append(int(entry.name))
    return found


@pytest.fixture
def no_leftovers() -> Iterator[None]:
    """Fails the test when a sandboxed process outlives its call."""
    assert sandbox_processes() == []
    yield
    assert sandbox_processes() == []


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A port the host listens on at 127.0.0.1."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        yield server


@needs_bwrap
def test_normal_code_prints_runs_in_its_own_tmp_with_a_clean_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RLFLEET_TEST_SECRET", "hunter2")
    code = (
        "import os\n"
        "open('notes.txt', 'w').write('kept')\n"
        "print(os.getcwd(), open('notes.txt').read(), 'RLFLEET_TEST_SECRET' in os.environ)\n"
        "print(sum(range(10)))"
    )
    result = sandboxed(code)
    assert result == SandboxResult(stdout="/tmp kept False\n45\n", stderr="", exit_code=0)
    assert result.ok


@needs_bwrap
def test_an_exception_is_a_traceback_of_the_code_alone() -> None:
    result = sandboxed("x = 1\nraise ValueError('nope')")
    assert result.exit_code == 1 and result.killed is None
    assert 'File "<code>", line 2, in <module>' in result.stderr
    assert "raise ValueError('nope')" in result.stderr  # the source line is shown
    assert result.stderr.rstrip().endswith("ValueError: nope")
    assert "exec(" not in result.stderr  # the launcher's frame is not


@needs_bwrap
def test_code_larger_than_a_pipe_buffer_is_fed_whole() -> None:
    code = "# padding\n" * 50_000 + "print('end')"
    assert sandboxed(code).stdout == "end\n"


@needs_bwrap
def test_the_code_cannot_reach_the_internet() -> None:
    result = sandboxed("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=3)")
    assert result.exit_code == 1
    assert "OSError: [Errno 101] Network is unreachable" in result.stderr


@needs_bwrap
def test_the_code_cannot_reach_a_port_the_host_listens_on(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    result = sandboxed(f"import socket\nsocket.create_connection(('127.0.0.1', {port}))")
    assert result.exit_code == 1
    assert "ConnectionRefusedError" in result.stderr
    with pytest.raises(BlockingIOError):
        listener.accept()  # nothing ever connected


@needs_bwrap
@pytest.mark.parametrize(
    "target",
    [str(REPO_ROOT / "sandbox-escape.txt"), "/etc/sandbox-escape.txt", "/root/x", "/home/x"],
)
def test_the_code_cannot_write_outside_its_tmp(target: str) -> None:
    result = sandboxed(f"open({target!r}, 'w').write('escaped')")
    assert result.exit_code == 1
    assert "Read-only file system" in result.stderr or "Permission denied" in result.stderr
    assert not os.path.exists(target)


@needs_bwrap
def test_the_hosts_tmp_and_home_are_hidden() -> None:
    """The host's /tmp (sockets, other jobs' files) and /root are empty inside; under /root
    only the directories of the interpreter itself are bound back."""
    secret_dir = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        (secret_dir / "token.txt").write_text("hunter2")
        code = f"import os\nprint(os.path.exists({str(secret_dir)!r}), os.listdir('/root'))"
        exists, _, listed = sandboxed(code).stdout.strip().partition(" ")
    finally:
        shutil.rmtree(secret_dir)
    assert exists == "False"
    interpreter = (sys.prefix, sys.base_prefix, os.path.realpath(sys.executable))
    allowed = {Path(path).parts[2] for path in interpreter if path.startswith("/root/")}
    assert set(ast.literal_eval(listed)) <= allowed


@needs_bwrap
def test_the_tmp_is_private_to_one_call() -> None:
    assert sandboxed("open('/tmp/left.txt', 'w').write('x')").ok
    assert sandboxed("import os\nprint(os.path.exists('/tmp/left.txt'))").stdout == "False\n"
    assert not os.path.exists("/tmp/left.txt")


@needs_bwrap
def test_a_file_past_the_tmp_size_is_refused() -> None:
    limits = SandboxLimits(tmp_mb=8, max_output_bytes=4096)
    result = run_python("open('/tmp/big', 'wb').write(b'x' * (9 * 2**20))", limits, "bubblewrap")
    assert result.exit_code == 1
    assert "OSError: [Errno 27] File too large" in result.stderr


@needs_bwrap
@pytest.mark.parametrize("directory", ["/tmp", "/dev/shm"])
def test_the_tmpfs_are_size_capped(directory: str) -> None:
    """Files under the per-file limit still cannot fill the host's memory through a tmpfs."""
    limits = SandboxLimits(tmp_mb=8, max_output_bytes=4096)
    code = f"for i in range(4):\n    open(f'{directory}/part{{i}}', 'wb').write(b'x' * (3 * 2**20))"
    result = run_python(code, limits, "bubblewrap")
    assert result.exit_code == 1
    assert "OSError: [Errno 28] No space left on device" in result.stderr


@needs_bwrap
def test_a_fork_bomb_is_refused_and_leaves_nothing_behind(no_leftovers: None) -> None:
    started = time.monotonic()
    result = sandboxed("import os\nwhile True:\n    os.fork()")
    assert time.monotonic() - started < FAST.wall_s + 2
    assert result.killed in ("processes", "time")
    assert subprocess.run(["true"], timeout=5).returncode == 0  # the host still forks


@needs_bwrap
def test_a_stubborn_fork_bomb_stays_under_its_process_cap(no_leftovers: None) -> None:
    """A bomb that ignores every refused fork runs until the wall clock; meanwhile the sandbox
    never holds more than ``max_processes`` processes, and the host stays responsive."""
    code = (
        "import os, time\n"
        "while True:\n"
        "    try:\n"
        "        os.fork()\n"
        "    except OSError:\n"
        "        time.sleep(0.001)\n"
    )
    limits = SandboxLimits(cpu_s=2, wall_s=3, max_processes=8, max_output_bytes=4096)
    most = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal most
        while not done.is_set():
            most = max(most, len(sandbox_processes()))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.monotonic()
    try:
        result = run_python(code, limits, "bubblewrap")
    finally:
        done.set()
        watcher.join()
    assert result.timed_out and result.killed == "time" and result.exit_code is None
    assert time.monotonic() - started < limits.wall_s + 2
    assert 0 < most <= limits.max_processes


@needs_bwrap
@pytest.mark.skipif(os.geteuid() != 0, reason="the own uid is used only when the caller is root")
def test_as_root_the_code_runs_as_an_unprivileged_uid_of_its_own() -> None:
    code = (
        "import os\n"
        "print(os.getuid(), os.geteuid())\n"
        "for line in open('/proc/self/status'):\n"
        "    if line.startswith(('Cap', 'NoNewPrivs')):\n"
        "        print(line.strip())"
    )
    lines = sandboxed(code).stdout.splitlines()
    uid, euid = map(int, lines[0].split())
    assert uid == euid and uid > SANDBOX_UID_BASE
    status = dict(line.split(":\t") for line in lines[1:])
    for capabilities in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert int(status[capabilities], 16) == 0
    assert status["NoNewPrivs"] == "1"


@needs_bwrap
def test_a_memory_bomb_hits_the_memory_limit() -> None:
    started = time.monotonic()
    result = sandboxed("x = bytearray(4 * 2**30)\nprint('allocated')")
    assert time.monotonic() - started < FAST.wall_s
    assert result.killed == "memory" and result.stdout == ""
    assert "MemoryError" in result.stderr


@needs_bwrap
def test_an_endless_loop_is_stopped_at_its_time_limit(no_leftovers: None) -> None:
    started = time.monotonic()
    result = sandboxed("while True:\n    pass")
    assert time.monotonic() - started < FAST.wall_s + 2
    assert result.killed in ("cpu", "time")  # CPU time first, unless the machine is busy


@needs_bwrap
def test_a_sleeping_program_is_stopped_at_the_wall_clock(no_leftovers: None) -> None:
    started = time.monotonic()
    result = sandboxed("import time\nprint('before', flush=True)\ntime.sleep(60)")
    elapsed = time.monotonic() - started
    assert FAST.wall_s <= elapsed < FAST.wall_s + 2
    assert result.timed_out and result.killed == "time" and result.stdout == "before\n"


@needs_bwrap
def test_an_output_flood_is_cut_at_the_cap_and_stopped(no_leftovers: None) -> None:
    started = time.monotonic()
    result = sandboxed("import sys\nwhile True:\n    print('x' * 1000)\n    sys.stderr.write('y')")
    assert time.monotonic() - started < FAST.wall_s
    assert result.killed == "output"
    assert len(result.stdout.encode()) + len(result.stderr.encode()) <= FAST.max_output_bytes
    assert result.stdout.startswith("x" * 1000)


@needs_bwrap
def test_background_processes_end_with_the_call(no_leftovers: None) -> None:
    code = (
        "import subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])"
    )
    assert sandboxed(code).ok


def test_none_runs_unsandboxed_and_says_so_only_by_being_asked(tmp_path: Path) -> None:
    """``none`` is explicit and really unsandboxed: the host's files are there; the limits on
    time, memory and output still hold."""
    host_file = tmp_path / "host.txt"
    host_file.write_text("on the host")
    result = run_python(f"print(open({str(host_file)!r}).read())", FAST, "none")
    assert result == SandboxResult(stdout="on the host\n", stderr="", exit_code=0)
    assert run_python("x = bytearray(4 * 2**30)", FAST, "none").killed == "memory"
    slept = run_python("import time\ntime.sleep(60)", SandboxLimits(wall_s=1), "none")
    assert slept.timed_out and slept.killed == "time"


def test_none_runs_in_a_temporary_directory_removed_afterwards() -> None:
    result = run_python("import os\nprint(os.getcwd())", FAST, "none")
    workdir = result.stdout.strip()
    assert os.path.basename(workdir).startswith("rlfleet-python-")
    assert not os.path.exists(workdir)


def test_check_sandbox_accepts_none_without_probing() -> None:
    check_sandbox("none", bwrap="/nonexistent/bwrap")


def test_check_sandbox_refuses_a_missing_bwrap_in_one_line() -> None:
    with pytest.raises(SandboxUnavailable) as caught:
        check_sandbox("bubblewrap", bwrap="/nonexistent/bwrap")
    assert str(caught.value) == (
        "env.kwargs.sandbox: bubblewrap (/nonexistent/bwrap) is not installed or cannot create "
        "namespaces here (/nonexistent/bwrap not found on PATH); install the bubblewrap "
        "package or set env.kwargs.sandbox: none to run model-written code unsandboxed"
    )


def test_check_sandbox_names_why_bwrap_cannot_create_namespaces(tmp_path: Path) -> None:
    fake = tmp_path / "bwrap"
    fake.write_text(
        "#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(SandboxUnavailable) as caught:
        check_sandbox("bubblewrap", bwrap=str(fake))
    message = str(caught.value)
    assert "\n" not in message
    assert "(bwrap: No permissions to creating new namespace)" in message
    assert message.endswith("set env.kwargs.sandbox: none to run model-written code unsandboxed")


@needs_bwrap
def test_check_sandbox_passes_where_bubblewrap_runs() -> None:
    check_sandbox("bubblewrap")


def test_an_unknown_sandbox_is_refused() -> None:
    with pytest.raises(ValueError, match="must be bubblewrap or none, not 'docker'"):
        check_sandbox("docker")
    with pytest.raises(ValueError, match="must be bubblewrap or none"):
        run_python("print(1)", FAST, "docker")  # type: ignore[arg-type]


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="wall_s must be a positive number, not 0"):
        SandboxLimits(wall_s=0)
