"""The worker process that runs a reward function, so that a stuck call can be killed.

A thread cannot be stopped, and a reward function stuck in C code that holds the GIL (a
catastrophically backtracking regex on a long response) does not even let the caller's thread
run. So ``FunctionScorer`` (``rlfleet.reward.scorers``) runs its function in a ``RewardWorker``:
a child Python process of its own, started with ``python -c`` (no fork of the actor's threads,
no re-import of the actor's ``__main__``) in a session of its own, with the parent's
``sys.path``. The worker loads ``"module:function"`` once and then answers one call at a time
over a socket pair, so the start cost (an interpreter and the function's imports, about 50 ms
for the built-in functions) is paid once per scorer, and a call costs a round trip of pickled
lists (about 0.1 ms more than a direct call for a batch of 64 short responses).

A call that runs past its timeout gets its worker's whole process group killed (SIGTERM, then
SIGKILL after ``KILL_GRACE_S``) and a fresh worker started at once, so the next call finds it
loaded. A worker that dies on its own (a segfault, ``os._exit``) is replaced the same way. The
worker dies with its parent (``PR_SET_PDEATHSIG`` on Linux) and when its ``RewardWorker`` is
closed or garbage collected.

The worker sends back only builtins: the scores as a list of floats (``plain_scores``), or the
name and text of the exception the function raised, so that no user type is unpickled in the
actor.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Collection, Mapping, Sequence
from multiprocessing.connection import Connection, Pipe
from typing import Any

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0
"""How long a worker may take to start and import its reward function."""
KILL_GRACE_S = 0.5
"""How long a worker has to exit after SIGTERM before it gets SIGKILL."""
INLINE_SEND_BYTES = 64 * 1024
"""Requests up to this size are written by the caller; larger ones by a helper thread, so that
the call's timeout also bounds the write if the worker stops reading."""
VALUE_PREVIEW_CHARS = 40

_BOOTSTRAP = """\
import sys
from multiprocessing.connection import Connection
connection = Connection(int(sys.argv[1]))
sys.path[:] = connection.recv()
from rlfleet.reward.worker import serve
serve(connection, int(sys.argv[2]))
"""


class BadScores(ValueError):
    """The function's result is not one finite number per sample; ``detail`` says how (without
    the reward source), ``indices`` name the samples concerned."""

    def __init__(self, detail: str, indices: Sequence[int] = ()) -> None:
        super().__init__(detail)
        self.detail = detail
        self.indices = tuple(indices)

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.detail, self.indices)


class FunctionRaised(Exception):
    """The reward function raised ``type_name``; the worker's traceback is ``remote_traceback``."""

    def __init__(self, type_name: str, message: str, remote_traceback: str = "") -> None:
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback
        if remote_traceback:  # shown with the error's chain, not in its one-line message
            self.add_note("in the reward worker process:\n" + remote_traceback.rstrip())

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.type_name, self.message, self.remote_traceback)


class WorkerTimeout(Exception):
    """The worker did not answer in time (``loading``: did not load the function in time); it
    was killed and replaced."""

    def __init__(self, message: str, loading: bool = False) -> None:
        super().__init__(message)
        self.loading = loading


class WorkerDied(RuntimeError):
    """The worker process ended during a call (the text says how); it was replaced."""


def value_preview(value: Any) -> str:
    """``repr(value)``, cut to ``VALUE_PREVIEW_CHARS`` characters."""
    try:
        text = repr(value)
    except Exception:  # an int beyond sys.get_int_max_str_digits(), a broken __repr__
        text = f"<{type(value).__name__}>"
    if len(text) > VALUE_PREVIEW_CHARS:
        text = f"{text[:VALUE_PREVIEW_CHARS]}..."
    return text


def plain_scores(scores: Any, count: int) -> list[float]:
    """``scores`` (a list, numpy array...) as ``count`` finite floats, else ``BadScores``."""
    if isinstance(scores, (str, bytes, Mapping)) or not isinstance(scores, Collection):
        raise BadScores(f"returned a {type(scores).__name__}, not a list of scores")
    scores = list(scores)
    if len(scores) != count:
        raise BadScores(f"returned {len(scores)} scores for {count} samples")
    checked = []
    for index, score in enumerate(scores):
        if isinstance(score, bool) or not isinstance(score, numbers.Real):
            raise BadScores(
                f"returned {value_preview(score)} ({type(score).__name__}) for sample {index}, "
                "not a number",
                [index],
            )
        try:
            value = float(score)
        except (OverflowError, ValueError, TypeError):
            value = math.nan
        if not math.isfinite(value):
            shown = value_preview(score)
            if not isinstance(score, float):
                shown += f" ({type(score).__name__})"
            raise BadScores(
                f"returned {shown} for sample {index}, a value that is not a finite float",
                [index],
            )
        checked.append(value)
    return checked


# --- in the worker process ---------------------------------------------------------------------


def serve(connection: Connection, parent_pid: int) -> None:
    """The worker's life: load the function, answer calls until the parent goes, then exit."""
    _die_with_parent(parent_pid)
    _, spec, kwargs = connection.recv()
    try:
        from rlfleet.reward.functions import load_function

        function = load_function(spec)
    except BaseException as exc:
        connection.send(("load_error", type(exc).__name__, _text(exc)))
        os._exit(0)
    connection.send(("ready", os.getpid()))
    while True:
        try:
            prompts, responses, columns = connection.recv()
        except (EOFError, OSError):
            os._exit(0)  # the parent closed the connection or died
        try:
            result = function(prompts, responses, **columns, **kwargs)
            reply: tuple[Any, ...] = ("scores", plain_scores(result, len(prompts)))
        except BadScores as exc:
            reply = ("bad_scores", exc.detail, exc.indices)
        except BaseException as exc:  # KeyboardInterrupt and SystemExit included
            reply = ("raised", type(exc).__name__, _text(exc), traceback.format_exc())
        connection.send(reply)


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return "<unprintable>"


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies, even while a call holds the GIL (Linux)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(0)  # the parent is already gone


# --- in the actor --------------------------------------------------------------------------------


class RewardWorker:
    """A warm worker process that calls ``spec``'s function with ``kwargs``; ``call`` is safe to
    use from several threads (calls run one at a time)."""

    def __init__(
        self, spec: str, kwargs: Mapping[str, Any], start_timeout_s: float = START_TIMEOUT_S
    ) -> None:
        """Start the worker and wait until it has loaded the function: a ``ValueError`` with
        ``load_function``'s message when it cannot."""
        self.spec = spec
        self.kwargs = dict(kwargs)
        self.start_timeout_s = start_timeout_s
        self._sys_path = list(sys.path)
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._connection: Connection | None = None
        self._stop: weakref.finalize | None = None
        self._ready = False
        with self._lock:
            self._start()
            self._wait_ready()

    @property
    def pid(self) -> int | None:
        """The current worker process's id (None once closed)."""
        return None if self._process is None else self._process.pid

    def call(
        self,
        prompts: list[str],
        responses: list[str],
        columns: dict[str, list[Any]],
        timeout_s: float,
    ) -> list[float]:
        """The scores, or ``FunctionRaised``, ``BadScores``, ``WorkerTimeout`` (the call ran
        ``timeout_s`` seconds) or ``WorkerDied``; after the last two the worker is replaced."""
        request = pickle.dumps((prompts, responses, columns), protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            if self._process is None:
                self._start()
            elif _has_exited(self._process.pid):
                pid, status = self._process.pid, self._died()
                logger.warning(
                    "%s: worker process %d %s; started %d", self.spec, pid, status, self.pid
                )
            try:
                self._wait_ready()
            except ValueError as exc:
                raise WorkerDied(f"a new worker process could not load it: {exc}") from exc
            reply = self._exchange(request, timeout_s)
        kind, *rest = reply
        if kind == "scores":
            return rest[0]
        if kind == "bad_scores":
            raise BadScores(*rest)
        if kind == "raised":
            raise FunctionRaised(*rest)
        raise WorkerDied(f"worker process answered {kind!r}")  # pragma: no cover

    def close(self) -> None:
        """Stop the worker process (a later ``call`` starts a new one)."""
        with self._lock:
            if self._stop is not None:
                self._stop()
            self._process = self._connection = self._stop = None
            self._ready = False

    def _start(self) -> None:
        """Start a worker process and send it what to load; ``_wait_ready`` waits for it."""
        parent_end, child_end = Pipe(duplex=True)
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, str(child_end.fileno()), str(os.getpid())],
                pass_fds=[child_end.fileno()],
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()
        self._process, self._connection, self._ready = process, parent_end, False
        self._stop = weakref.finalize(self, _stop_process, process, parent_end)
        try:  # small messages: they fit in the socket's buffer while the worker starts
            parent_end.send(self._sys_path)
            parent_end.send(("load", self.spec, self.kwargs))
        except OSError:
            pass  # the worker died at once: _wait_ready reports it

    def _replace(self) -> None:
        """Kill the worker process (its whole process group) and start a fresh one."""
        if self._stop is not None:
            self._stop()
        self._start()

    def _wait_ready(self) -> None:
        if self._ready:
            return
        assert self._process is not None and self._connection is not None
        try:
            loaded = self._connection.poll(self.start_timeout_s)
            if loaded:
                kind, *rest = self._connection.recv()
        except (EOFError, OSError) as exc:
            raise WorkerDied(f"its worker process {self._died()} while loading it") from exc
        if not loaded:
            self._replace()
            raise WorkerTimeout(
                f"its worker process did not load it within {self.start_timeout_s:g} s",
                loading=True,
            )
        if kind == "load_error":
            type_name, message = rest
            if self._stop is not None:
                self._stop()
            self._process = self._connection = self._stop = None
            if type_name == "ValueError":
                raise ValueError(message)
            raise ValueError(
                f"reward function {self.spec!r}: importing it raised {type_name}: {message}"
            )
        self._ready = True

    def _exchange(self, request: bytes, timeout_s: float) -> tuple[Any, ...]:
        """Send ``request``, wait at most ``timeout_s`` for the reply."""
        connection = self._connection
        assert connection is not None
        deadline = time.monotonic() + timeout_s
        sender = None
        try:
            if len(request) <= INLINE_SEND_BYTES:
                connection.send_bytes(request)
            else:
                sender = threading.Thread(
                    target=_send_quietly, args=(connection, request), daemon=True
                )
                sender.start()
            answered = connection.poll(max(deadline - time.monotonic(), 0.0))
            reply = connection.recv() if answered else None
        except (EOFError, OSError) as exc:
            raise WorkerDied(f"its worker process {self._died(sender)}") from exc
        if reply is not None:
            if sender is not None:
                sender.join()  # done: the worker read the whole request before answering
            return reply
        pid = self.pid
        self._kill(sender)
        self._replace()
        logger.warning(
            "%s: call ran past %g s; killed worker process %d and started %d",
            self.spec,
            timeout_s,
            pid,
            self.pid,
        )
        raise WorkerTimeout(f"did not return within {timeout_s:g} s")

    def _kill(self, sender: threading.Thread | None = None) -> None:
        """Kill the worker process and its group, then wait for ``sender``, whose write fails
        once the worker is gone: only then may the connection be closed (its descriptor could
        be reused by the next worker's while the write goes on)."""
        assert self._process is not None
        _kill_group(self._process)
        if sender is not None:
            sender.join()

    def _died(self, sender: threading.Thread | None = None) -> str:
        """How the worker process ended; a fresh one is started."""
        process = self._process
        assert process is not None
        exited = _has_exited(process.pid, KILL_GRACE_S)
        self._kill(sender)
        self._replace()
        if not exited:
            return "closed its connection"
        return _exit_status(process.returncode)


def _send_quietly(connection: Connection, request: bytes) -> None:
    try:
        connection.send_bytes(request)
    except Exception:
        pass  # the worker was killed: the caller reports it


def _exit_status(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def _stop_process(process: subprocess.Popen[bytes], connection: Connection) -> None:
    """Kill ``process`` and its process group, then close its connection."""
    _kill_group(process)
    connection.close()


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """Kill ``process`` and its process group (the processes the function started): SIGTERM,
    then SIGKILL after ``KILL_GRACE_S``; reap ``process``."""
    if process.returncode is not None:
        return  # reaped already: its id, the group's, may have been reused
    if not _has_exited(process.pid):
        _signal_group(process.pid, signal.SIGTERM)
        _has_exited(process.pid, KILL_GRACE_S)
    # what is left of the group, the process included; the process is reaped only now, so its
    # id (the group's id) cannot have been reused
    _signal_group(process.pid, signal.SIGKILL)
    process.wait()


def _has_exited(pid: int, timeout_s: float = 0.0) -> bool:
    """Whether child ``pid`` has exited (waiting up to ``timeout_s``), without reaping it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True  # already reaped
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass
