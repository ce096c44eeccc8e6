"""An actor that cannot start: the error its constructor raised, as one line, and when to stop
starting it again.

Ray reports an actor whose ``__init__`` raised as an ``ActorDiedError`` ("The actor died because
of an error raised in its creation task, ...") to every call made to it; the original error is
only text in that message, after Ray's header (in ANSI colours) and the remote traceback.
``creation_error`` takes it back out as ``Type: first line``.

A start that fails twice alike fails for a reason in the input, not by chance (a model
transformers cannot load, a KV cache larger than the node's memory): starting the actor again
would only fail again, so the job stops at once with the cause (``stop_if_repeated``) instead of
restarting it until its attempts run out. Alike: the same exception type and first line, numbers
aside (a memory reading, a pid or a port differs between two attempts of the same failure). A
failure that differs between attempts may be chance: the actor is started again.
"""

from __future__ import annotations

import re

ANSI_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
"""A terminal escape sequence (Ray colours its task names in error messages)."""

CREATION_FAILED = "raised in its creation task"
"""What Ray's message says of an actor whose constructor raised."""

FRAME = re.compile(r"^\s+File \"")
"""The first line of one frame of a Python traceback."""

NUMBER = re.compile(r"\d+(?:\.\d+)?")


class ActorCannotStart(RuntimeError):
    """An actor's constructor failed twice alike (or every start failed): the message names the
    actor and the error, on one line."""


def strip_ansi(text: str) -> str:
    return ANSI_ESCAPE.sub("", text)


def creation_error(error: BaseException) -> str | None:
    """``Type: first line`` of the error that an actor's constructor raised, when ``error`` is
    Ray's report of an actor that died of one (ANSI escapes stripped, the type without its
    module); None for any other error (an actor that died after it started, or no actor's
    death)."""
    from ray.exceptions import RayActorError

    if not isinstance(error, RayActorError):
        return None
    text = str(error)
    if not (error.actor_init_failed or CREATION_FAILED in text):
        return None
    return exception_line(text)


def exception_line(traceback_text: str) -> str | None:
    """The exception line of a formatted traceback (the first line after its last frame) as
    ``Type: message`` with the type's module and ANSI escapes left out; None when the text has
    no frame."""
    lines = strip_ansi(traceback_text).splitlines()
    frames = [number for number, line in enumerate(lines) if FRAME.match(line)]
    if not frames:
        return None
    for line in lines[frames[-1] + 1 :]:
        if line.strip() and not line[0].isspace():
            kind, _, message = line.strip().partition(":")
            kind, message = kind.rpartition(".")[2], message.strip()
            return f"{kind}: {message}" if message else kind
    return None


def same_failure(line: str, previous: str | None) -> bool:
    """Whether two creation errors (``creation_error``) are alike: equal once every number in
    them is masked."""
    return previous is not None and NUMBER.sub("#", line) == NUMBER.sub("#", previous)


def stop_if_repeated(actor: str, line: str | None, previous: str | None) -> None:
    """Raises ``ActorCannotStart`` (``<actor> cannot start: <line>``) when ``actor``'s constructor
    failed with ``line`` after failing alike the time before (``previous``; None: it did not
    fail in its constructor)."""
    if line is not None and same_failure(line, previous):
        raise ActorCannotStart(f"{actor} cannot start: {line}")
