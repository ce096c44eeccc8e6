"""Running model-written Python in a sandbox: Debian's bubblewrap (``bwrap``), or, only when a
user opts in explicitly, a plain subprocess.

What contains what (bubblewrap):

- the network: a new network namespace (``--unshare-net``) holds only its own loopback, so
  neither the internet nor a port the host listens on (127.0.0.1 included) can be reached;
- the file system: ``/`` is bound read-only; ``/root``, ``/home``, ``/run`` and ``/var/tmp`` are
  hidden under empty read-only tmpfs (a user's secrets stay out of reach); the code's only
  writable place is its private, size-capped ``/tmp`` (its working directory), gone after it;
- processes: a new PID namespace whose end kills every process left in it; ``RLIMIT_NPROC``
  caps processes and threads. The kernel exempts uid 0 from ``RLIMIT_NPROC``, so when the
  caller is root the code runs under an unprivileged uid of its own (``2**30 + the bwrap
  process's pid``, unique while it lives) with no capabilities and ``no_new_privs``: a fork
  bomb gets "Resource temporarily unavailable" after ``max_processes`` and never reaches the
  host's pid table;
- memory: ``RLIMIT_AS`` (an allocation past it raises ``MemoryError``); tmpfs sizes are capped;
- time: ``RLIMIT_CPU`` per process, and a wall-clock deadline after which the whole sandbox
  (its process group, and so its PID namespace) is killed;
- output: at most ``max_output_bytes`` of stdout and stderr together are read; past it the
  sandbox is killed, so a flood costs neither the host's memory nor time.

``sandbox="none"`` runs the same launcher in a plain subprocess with the same rlimits and
deadline, but with the network, the file system and the caller's uid fully reachable.
"""

from __future__ import annotations

import functools
import math
import os
import re
import select
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

SandboxKind = Literal["bubblewrap", "none"]
SANDBOXES: tuple[str, ...] = ("bubblewrap", "none")

HIDDEN_DIRS = ("/root", "/home", "/run", "/var/tmp")
"""Directories the sandbox sees empty: home directories (keys, tokens) and runtime sockets."""
SANDBOX_UID_BASE = 2**30
"""Where the sandbox's own uids start when the caller is root (far above distributions' and
subordinate-uid ranges)."""
FALLBACK_UID = 65534
"""``nobody``: the uid used where the caller's user namespace does not map the own uid."""

EXIT_MEMORY = 121
"""The launcher's exit status for a ``MemoryError`` the code did not catch."""
EXIT_PROCESSES = 122
"""The launcher's exit status for a refused fork or thread the code did not catch."""

_TEARDOWN_S = 10.0
"""The longest wait for a killed sandbox's processes to be gone (they go in milliseconds)."""
_SIGNALS_BY_LIMIT = {signal.SIGXCPU: "cpu", signal.SIGXFSZ: "file_size"}


@dataclass(frozen=True)
class SandboxLimits:
    """Per-call limits. Each bounds what one call may take from the host."""

    cpu_s: float = 5.0
    """CPU seconds per process (``RLIMIT_CPU``, rounded up to whole seconds)."""
    wall_s: float = 10.0
    """Wall-clock seconds of the whole call; past it the sandbox is killed."""
    memory_mb: int = 512
    """Address space per process (``RLIMIT_AS``). The sandbox's memory is bounded by
    ``max_processes * memory_mb`` plus its two tmpfs."""
    max_processes: int = 8
    """Processes and threads together (``RLIMIT_NPROC``; see the module's docstring)."""
    max_output_bytes: int = 16_384
    """Bytes of stdout and stderr together; past it the sandbox is killed."""
    tmp_mb: int = 64
    """Size of the private ``/tmp`` and ``/dev/shm`` tmpfs, and the largest file."""

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"sandbox limit {name} must be a positive number, not {value!r}")


@dataclass(frozen=True)
class SandboxResult:
    """How one call ended. ``killed`` names the limit that stopped it, if any: ``"time"``
    (wall clock; ``timed_out`` too), ``"cpu"``, ``"memory"``, ``"processes"``, ``"output"``,
    ``"file_size"``, or ``"signal N"`` for another signal."""

    stdout: str
    stderr: str
    exit_code: int | None
    """The code's exit status (None when the sandbox was killed from outside)."""
    timed_out: bool = False
    killed: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.killed is None


class SandboxUnavailable(RuntimeError):
    """The sandbox asked for cannot run here; the message is one line saying what to do."""


def check_sandbox(sandbox: str, bwrap: str = "bwrap") -> None:
    """Raises ``SandboxUnavailable`` (one line) unless ``sandbox`` can run code here, so that a
    job without a working sandbox stops before any model-written code runs. bubblewrap is
    probed once per process and binary by running ``pass`` in it."""
    _check_kind(sandbox)
    if sandbox == "none":
        return
    reason = _bubblewrap_problem(bwrap)
    if reason:
        raise SandboxUnavailable(
            f"env.kwargs.sandbox: bubblewrap ({bwrap}) is not installed or cannot create "
            f"namespaces here ({reason}); install the bubblewrap package or set "
            "env.kwargs.sandbox: none to run model-written code unsandboxed"
        )


def run_python(
    code: str,
    limits: SandboxLimits | None = None,
    sandbox: SandboxKind = "bubblewrap",
    *,
    bwrap: str = "bwrap",
    python: str | None = None,
) -> SandboxResult:
    """Runs ``code`` as a Python program (the ``python`` running this one, isolated mode) under
    ``limits``, in ``sandbox``, and says how it ended; never raises for what the code does."""
    _check_kind(sandbox)
    limits = limits or SandboxLimits()
    python = python or sys.executable
    launcher = _launcher_command(python, limits)
    if sandbox == "none":
        with tempfile.TemporaryDirectory(prefix="rlfleet-python-") as workdir:
            return _run(launcher, code, limits, cwd=workdir)
    resolved = shutil.which(bwrap) or bwrap
    info_read, info_write = os.pipe()
    try:
        args = [*_bubblewrap_args(python, limits), "--info-fd", str(info_write)]
        command = [resolved, *args, "--", *launcher]
        return _run(command, code, limits, cwd="/", info=(info_read, info_write))
    finally:
        os.close(info_read)


def _check_kind(sandbox: str) -> None:
    if sandbox not in SANDBOXES:
        raise ValueError(f"env.kwargs.sandbox must be bubblewrap or none, not {sandbox!r}")


@functools.cache
def _bubblewrap_problem(bwrap: str) -> str | None:
    """Why bubblewrap cannot run code here (one line), or None. The probe is a real call
    (``pass``), so an interpreter the sandbox cannot reach is caught here too."""
    if shutil.which(bwrap) is None:
        return f"{bwrap} not found on PATH"
    try:
        probe = run_python("pass", SandboxLimits(), "bubblewrap", bwrap=bwrap)
    except OSError as error:
        return " ".join(str(error).split())
    if probe.ok:
        return None
    lines = probe.stderr.strip().splitlines()
    return lines[-1].strip() if lines else f"exit status {probe.exit_code}, {probe.killed}"


def _bubblewrap_args(python: str, limits: SandboxLimits) -> list[str]:
    """bwrap's arguments: namespaces, the read-only root with home and runtime directories
    hidden (the interpreter's own directories bound back), a private ``/tmp`` as the working
    directory, a clean environment."""
    tmp_bytes = str(limits.tmp_mb * 1024 * 1024)
    args = ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    args += ["--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
    args += ["--unshare-cgroup-try", "--die-with-parent", "--new-session"]
    if os.geteuid() == 0:
        # Root's bwrap keeps every capability; keep only what dropping to the own uid needs.
        args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    keep = _interpreter_dirs(python)
    for hidden in HIDDEN_DIRS:
        if os.path.isdir(hidden) and not os.path.islink(hidden):
            args += ["--perms", "0755", "--tmpfs", hidden, *_bind_back(hidden, keep)]
            args += ["--remount-ro", hidden]
    for private in ("/tmp", "/dev/shm"):
        args += ["--perms", "1777", "--size", tmp_bytes, "--tmpfs", private]
        args += _bind_back(private, keep)
    args += ["--chdir", "/tmp", "--clearenv"]
    for name, value in _sandbox_env().items():
        args += ["--setenv", name, value]
    return args


def _bind_back(hidden: str, keep: list[str]) -> list[str]:
    """Those of ``keep`` under ``hidden`` (a fresh tmpfs) bound back read-only, their parents
    made traversable (bwrap would create them 0700)."""
    args = []
    for path in keep:
        if not path.startswith(hidden + "/"):
            continue
        parts = path[len(hidden) + 1 :].split("/")
        for depth in range(1, len(parts)):
            args += ["--perms", "0755", "--dir", "/".join([hidden, *parts[:depth]])]
        args += ["--ro-bind", path, path]
    return args


def _interpreter_dirs(python: str) -> list[str]:
    """The directories the interpreter needs: this one's prefixes; ``python``'s prefix (the
    directory above its ``bin``, a virtual environment's root) and its real executable's."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths.add(os.path.dirname(os.path.realpath(python)))
    paths.add(os.path.dirname(os.path.dirname(os.path.abspath(python))))
    real = sorted({os.path.realpath(path) for path in paths} | paths)
    return [path for path in real if not any(path.startswith(other + "/") for other in real)]


def _sandbox_env() -> dict[str, str]:
    """The code's whole environment: nothing of the caller's (tokens live in environments);
    one arena and one BLAS thread, so threads do not eat the address-space limit."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/tmp",
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        "MALLOC_ARENA_MAX": "2",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _launcher_command(python: str, limits: SandboxLimits) -> list[str]:
    cpu = math.ceil(limits.cpu_s)
    memory = limits.memory_mb * 1024 * 1024
    file_size = limits.tmp_mb * 1024 * 1024
    numbers = [cpu, memory, limits.max_processes, file_size, EXIT_MEMORY, EXIT_PROCESSES]
    return [python, "-I", "-B", "-c", _LAUNCHER, *map(str, numbers)]


def _run(
    command: list[str],
    code: str,
    limits: SandboxLimits,
    *,
    cwd: str,
    info: tuple[int, int] | None = None,
) -> SandboxResult:
    """Starts ``command`` in its own process group, feeds it the uid line and the code, reads
    its output under the caps and the deadline, and ends the sandbox whatever happened.
    ``info``: bwrap's ``--info-fd`` pipe, which names the sandbox's first process."""
    deadline = time.monotonic() + limits.wall_s
    try:
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=_sandbox_env(),
            start_new_session=True,
            pass_fds=info[1:] if info else (),
        )
    finally:
        if info:
            os.close(info[1])  # bwrap holds its own copy: EOF once bwrap is done with it
    call = _Call(process, info[0] if info else None, limits.max_output_bytes)
    own_uid = info is not None and os.geteuid() == 0
    uid = SANDBOX_UID_BASE + process.pid if own_uid else 0
    try:
        stopped = call.exchange(
            f"{uid}\n".encode() + code.encode(errors="surrogateescape"), deadline
        )
    finally:
        call.end()
    stdout, stderr = call.output()
    exit_code = None if stopped else process.returncode
    return SandboxResult(
        stdout=stdout.decode("utf-8", errors="replace"),
        stderr=stderr.decode("utf-8", errors="replace"),
        exit_code=exit_code,
        timed_out=stopped == "time",
        killed=stopped or _limit_hit(exit_code),
    )


class _Call:
    """One running sandbox: feeds its stdin, reads its output and bwrap's info without ever
    blocking past the deadline, and ends it (every process in it) at the end."""

    def __init__(self, process: subprocess.Popen[bytes], info: int | None, cap: int) -> None:
        assert process.stdin and process.stdout and process.stderr
        self.process = process
        self.stdin = process.stdin.fileno()
        self.outputs = {process.stdout.fileno(): [], process.stderr.fileno(): []}
        self.info_fd = info
        self.info = b""
        self.sandbox_pidfd: int | None = None
        self.cap = cap
        self.total = 0

    def exchange(self, feed: bytes, deadline: float) -> str | None:
        """Runs until stdout and stderr close and the process exits: None; or until the output
        passes the cap (``"output"``) or the deadline passes (``"time"``)."""
        with selectors.DefaultSelector() as selector:
            os.set_blocking(self.stdin, False)
            selector.register(self.stdin, selectors.EVENT_WRITE)
            for fd in [*self.outputs, *([self.info_fd] if self.info_fd is not None else [])]:
                selector.register(fd, selectors.EVENT_READ)
            while selector.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return "time"
                for key, _ in selector.select(remaining):
                    if key.fd == self.stdin:
                        feed = self._write(selector, feed)
                    elif self._read(selector, key.fd):
                        return "output"
        try:
            self.process.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            return "time"
        return None

    def _write(self, selector: selectors.BaseSelector, feed: bytes) -> bytes:
        """Writes what the pipe takes; closes stdin once all is written or nobody reads."""
        try:
            written = os.write(self.stdin, feed)
        except BlockingIOError:
            return feed
        except BrokenPipeError:
            written = len(feed)
        feed = feed[written:]
        if not feed:
            selector.unregister(self.stdin)
            assert self.process.stdin
            self.process.stdin.close()
        return feed

    def _read(self, selector: selectors.BaseSelector, fd: int) -> bool:
        """Reads one chunk of ``fd``; True when the output has passed the cap."""
        data = os.read(fd, 65536)
        if not data:
            selector.unregister(fd)
        if fd == self.info_fd:
            self.info += data
            self._open_sandbox_pidfd()
            return False
        self.outputs[fd].append(data)
        self.total += len(data)
        return self.total > self.cap

    def _open_sandbox_pidfd(self) -> None:
        """A pidfd of the sandbox's first process (PID 1 of its namespace) once bwrap names it:
        that process exits only after every process in the namespace is gone. Checked to be
        bwrap's child, so a reused pid is never taken for it."""
        found = re.search(rb'"child-pid":\s*(\d+)', self.info)
        if self.sandbox_pidfd is not None or found is None:
            return
        pid = int(found.group(1))
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return
        if _parent_pid(pid) == self.process.pid:
            self.sandbox_pidfd = pidfd
        else:
            os.close(pidfd)

    def end(self) -> None:
        """Kills the process group (bwrap or the plain subprocess, and what it left in its
        group) and the sandbox's PID namespace, and waits until all of it is gone."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.sandbox_pidfd is not None:
            try:
                signal.pidfd_send_signal(self.sandbox_pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            select.select([self.sandbox_pidfd], [], [], _TEARDOWN_S)
            os.close(self.sandbox_pidfd)
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream:
                stream.close()

    def output(self) -> tuple[bytes, bytes]:
        """stdout and stderr, together at most the cap (stdout first)."""
        stdout_fd, stderr_fd = self.outputs
        stdout = b"".join(self.outputs[stdout_fd])[: self.cap]
        stderr = b"".join(self.outputs[stderr_fd])[: self.cap - len(stdout)]
        return stdout, stderr


def _parent_pid(pid: int) -> int | None:
    """The parent of ``pid`` (from /proc; the command's name may hold spaces and parens)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _limit_hit(exit_code: int | None) -> str | None:
    """The limit an exit status says the code hit (bwrap reports a signal as 128 + N, a plain
    subprocess as -N)."""
    if exit_code is None or exit_code == 0:
        return None
    if exit_code == EXIT_MEMORY:
        return "memory"
    if exit_code == EXIT_PROCESSES:
        return "processes"
    number = -exit_code if exit_code < 0 else exit_code - 128 if exit_code > 128 else 0
    if number <= 0:
        return None
    return _SIGNALS_BY_LIMIT.get(number, f"signal {number}")


_LAUNCHER = r"""
# The sandbox's first process: reads the uid line and the code from stdin, sets the limits,
# leaves uid 0 for the own uid (no_new_privs first, so no setuid binary gives it back), runs
# the code as __main__ and gives a limit it hit an exit status of its own.
import ctypes, os, resource, sys, traceback, types
cpu, memory, processes, file_size, exit_memory, exit_processes = map(int, sys.argv[1:7])
uid_line = sys.stdin.buffer.readline()
code = sys.stdin.buffer.read()
null = os.open(os.devnull, os.O_RDONLY)
os.dup2(null, 0)
os.close(null)
def limit(kind, soft, hard):
    current = resource.getrlimit(kind)[1]
    if current != resource.RLIM_INFINITY:
        soft, hard = min(soft, current), min(hard, current)
    resource.setrlimit(kind, (soft, hard))
limit(resource.RLIMIT_CPU, cpu, cpu + 1)
limit(resource.RLIMIT_AS, memory, memory)
limit(resource.RLIMIT_NPROC, processes, processes)
limit(resource.RLIMIT_FSIZE, file_size, file_size)
limit(resource.RLIMIT_NOFILE, 256, 256)
limit(resource.RLIMIT_CORE, 0, 0)
uid = int(uid_line)
if uid:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        sys.exit("sandbox: could not set no_new_privs")
    os.setgroups([])
    header, caps = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()
    libc.capget(header, caps)
    caps[2] = caps[5] = 0  # the inheritable set: nothing may pass to a program it runs
    if libc.capset(header, caps) != 0:
        sys.exit("sandbox: could not clear inheritable capabilities")
    try:
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    except OSError:
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)
    if os.getuid() == 0 or os.geteuid() == 0:
        sys.exit("sandbox: could not leave uid 0")
source = code.decode("utf-8", "surrogateescape")
import linecache
linecache.cache["<code>"] = (len(source), None, source.splitlines(True), "<code>")
main = types.ModuleType("__main__")
main.__builtins__ = __builtins__
sys.modules["__main__"] = main
sys.argv = ["<code>"]
try:
    exec(compile(source, "<code>", "exec"), main.__dict__)
except SystemExit:
    raise
except BaseException as error:
    traceback.print_exception(type(error), error, error.__traceback__.tb_next)
    where = traceback.extract_tb(error.__traceback__)[-1].line or ""
    forked = isinstance(error, BlockingIOError) and "fork" in where
    refused = forked or "can't start new thread" in str(error)
    sys.exit(exit_memory if isinstance(error, MemoryError) else exit_processes if refused else 1)
"""
