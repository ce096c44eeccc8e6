"""Waiting on Ray calls with deadlines, in slices, so that the driver notices a stop signal and an
actor that stopped answering.

Signals: Python runs a signal handler in the main thread between two bytecodes. While that thread
is blocked in a Ray call (``ray.wait``, ``ray.get``), Ray runs the handlers itself, from C, and an
exception a handler raises there comes out of the call as a ``SystemError``. So a handler that
stops the driver records its exception with ``interrupt`` when the signal lands inside Ray
(``in_ray_call``), and every wait here is a loop of ``ray.wait`` calls of at most ``SLICE_S``
seconds that raises the recorded exception between two of them: a stop takes effect within about
a second, whatever the driver waits on.

Liveness: a long call (a learner's training step) may rightly take many minutes, so its deadline
cannot tell a stalled process (stopped with SIGSTOP, or frozen) from a busy one. ``Pings`` asks
each actor that a call waits on, every ``PING_INTERVAL_S``, for its process id on a concurrency
group of its own (``LIVENESS_GROUP``: the actor class must be made with
``ray.remote(concurrency_groups=LIVENESS_GROUPS)``; calling a group an actor lacks kills it), which
a busy actor answers at once from another thread; an actor whose ping goes unanswered for
``timeout_s`` has stalled.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import FrameType
from typing import Any

import ray

SLICE_S = 1.0
"""The longest single ``ray.wait``: how late a recorded stop or a check between slices may be."""

LIVENESS_GROUP = "liveness"
"""The concurrency group that answers liveness pings."""
LIVENESS_GROUPS = {LIVENESS_GROUP: 1}
"""``ray.remote(concurrency_groups=LIVENESS_GROUPS)``: an actor class that ``Pings`` may ask."""
PING_INTERVAL_S = 5.0
"""How often an actor that a call waits on is asked whether it is alive."""

_interrupted: BaseException | None = None


def interrupt(error: BaseException | None) -> None:
    """Has the next wait here (or ``raise_if_interrupted``) raise ``error``: for a signal handler
    that cannot raise where the signal landed (see the module's docstring). None forgets it."""
    global _interrupted
    _interrupted = error


def raise_if_interrupted() -> None:
    """Raises the error ``interrupt`` recorded, once."""
    global _interrupted
    error, _interrupted = _interrupted, None
    if error is not None:
        raise error


def in_ray_call(frame: FrameType | None) -> bool:
    """Whether ``frame`` (where a signal interrupted the main thread) or a frame that called it
    runs Ray's own code: an exception raised there may come out of Ray as a ``SystemError``."""
    package = os.path.dirname(os.path.abspath(ray.__file__)) + os.sep
    while frame is not None:
        if os.path.abspath(frame.f_code.co_filename).startswith(package):
            return True
        frame = frame.f_back
    return False


def wait(
    refs: Sequence[Any],
    deadline: float,
    num_returns: int | None = None,
    between: Callable[[], None] | None = None,
) -> tuple[list[Any], list[Any]]:
    """``ray.wait`` until ``num_returns`` of ``refs`` (all of them when None) are ready or
    ``deadline`` (``time.monotonic()``) has passed, in slices of at most ``SLICE_S``: between
    two slices a recorded stop is raised (``interrupt``) and ``between()`` runs (it may raise).
    Returns the ready refs and the others, as ``ray.wait`` does."""
    waiting = list(refs)
    wanted = len(waiting) if num_returns is None else min(num_returns, len(waiting))
    ready: list[Any] = []
    while len(ready) < wanted:
        raise_if_interrupted()
        left = deadline - time.monotonic()
        slice_s = max(0.0, min(SLICE_S, left))
        done, waiting = ray.wait(waiting, num_returns=wanted - len(ready), timeout=slice_s)
        ready.extend(done)
        raise_if_interrupted()
        if len(ready) >= wanted or left <= SLICE_S:
            break
        if between is not None:
            between()
    return ready, waiting


def get(ref: Any, timeout_s: float) -> Any:
    """``ray.get(ref)``, waiting at most ``timeout_s`` in slices (see ``wait``); a
    ``GetTimeoutError`` past it."""
    ready, _ = wait([ref], time.monotonic() + timeout_s)
    if not ready:
        raise ray.exceptions.GetTimeoutError(f"no answer within {timeout_s:g} s")
    return ray.get(ref)


def _pid(actor: Any) -> int:
    return os.getpid()


class Pings:
    """Liveness pings to actors (name -> handle, each made with ``LIVENESS_GROUPS``) while calls
    to them are outstanding; ``check`` is called between the slices of a wait."""

    def __init__(
        self, actors: Mapping[str, Any], timeout_s: float, interval_s: float = PING_INTERVAL_S
    ) -> None:
        self.actors = dict(actors)
        self.timeout_s = timeout_s
        self.interval_s = interval_s
        self.sent: dict[str, tuple[Any, float]] = {}
        """Each actor's latest ping and when it was sent (``time.monotonic()``)."""

    def check(self, names: Iterable[str]) -> list[str]:
        """Pings each of ``names`` (the actors whose calls are still outstanding) that has no
        ping out, or whose latest ping was answered and is ``interval_s`` old; returns those
        whose latest ping has gone unanswered for ``timeout_s``."""
        now = time.monotonic()
        stalled = []
        for name in names:
            latest = self.sent.get(name)
            if latest is not None:
                ref, sent_at = latest
                answered, _ = ray.wait([ref], timeout=0)
                if not answered:
                    if now - sent_at >= self.timeout_s:
                        stalled.append(name)
                    continue
                if now - sent_at < self.interval_s:
                    continue
            ping = self.actors[name].__ray_call__.options(concurrency_group=LIVENESS_GROUP)
            self.sent[name] = (ping.remote(_pid), now)
        return stalled
